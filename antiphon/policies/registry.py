"""Policy registry: a policy name -> its parameter model and its constructor.

    policy = build_policy("round_robin", {"segment_len": 8}, ensemble=("base", "aligned"))
    policies = PolicyCache()                        # what a coordinator resolves requests with
    policy = policies("round_robin", {"segment_len": 8}, ("base", "aligned"))  # built once

An unknown name raises `NotFound`; bad parameters raise `InvalidRequest` naming the field
(`policy_params.segment_len: ...`); parameters naming a model outside the ensemble raise
`InvalidRequest` too. Every policy the package ships is registered here, at the bottom;
others (a test's, a plugin's) join with `register_policy`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from antiphon.errors import InvalidRequest, NotFound, validation_message
from antiphon.policies.base import Policy
from antiphon.policies.baselines import (
    Fixed,
    FixedParams,
    PolicyParams,
    RandomSwitch,
    RandomSwitchParams,
    RoundRobin,
    RoundRobinParams,
    RuleRouter,
    RuleRouterParams,
    check_models,
)
from antiphon.policies.defer import Defer, DeferParams, RandomDefer, RandomDeferParams
from antiphon.policies.replay import ReplaySwitch, ReplaySwitchParams
from antiphon.policies.router import TrainedRouter, TrainedRouterParams
from antiphon.policies.search import W2SSearch, W2SSearchParams
from antiphon.policies.switcher import Switch, SwitchParams


@dataclass(frozen=True)
class PolicyEntry:
    params: type[PolicyParams]  # validates the request's policy_params
    build: Callable[[PolicyParams], Policy]  # makes the policy from validated params


_REGISTRY: dict[str, PolicyEntry] = {}


def register_policy(
    name: str, params: type[PolicyParams], build: Callable[[PolicyParams], Policy]
) -> None:
    """Add a policy under `name` (replacing one of the same name)."""
    _REGISTRY[name] = PolicyEntry(params, build)


def policy_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def request_params(name: str, params: Mapping[str, object]) -> dict[str, object]:
    """`params` of policy `name` without those only the server's config may set: what a
    request may send back (NotFound for an unknown policy)."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise NotFound(f"unknown policy {name!r}; known policies: {list(policy_names())}")
    return {k: v for k, v in params.items() if k not in entry.params.config_only}


def nameable_policies() -> tuple[str, ...]:
    """The policies a request may name for any ensemble: those that need no parameter that
    only the server's config sets (an ensemble's own policy it may name besides)."""
    return tuple(
        name
        for name in policy_names()
        if not any(
            _REGISTRY[name].params.model_fields[k].is_required()
            for k in _REGISTRY[name].params.config_only
        )
    )


def check_request_params(name: str, params: Mapping[str, object], own_policy: bool) -> None:
    """InvalidRequest if a request's policy_params set what only the server's config may
    (`PolicyParams.config_only`: paths, hub ids, deployments, patterns), or if the request
    names a policy (not its ensemble's own) that cannot run without such a parameter."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise NotFound(f"unknown policy {name!r}; known policies: {list(policy_names())}")
    config_only = entry.params.config_only
    given = sorted(config_only & set(params))
    if given:
        raise InvalidRequest(
            f"policy_params.{given[0]}: set by the server's config only, not by a request "
            f"({name!r} takes {sorted(config_only)} from its ensemble's config)"
        )
    needed = sorted(k for k in config_only if entry.params.model_fields[k].is_required())
    if needed and not own_policy:
        raise InvalidRequest(
            f"policy {name!r} needs {needed}, which only the server's config sets: name an "
            f"ensemble configured with it (GET /v1/models lists each ensemble's policy)"
        )


def validate_policy_params(
    name: str, params: Mapping[str, object] | None = None, ensemble: tuple[str, ...] | None = None
) -> PolicyParams:
    """Validated parameters of policy `name`; NotFound / InvalidRequest otherwise."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise NotFound(f"unknown policy {name!r}; known policies: {list(policy_names())}")
    try:
        validated = entry.params.model_validate(dict(params or {}))
    except ValidationError as e:
        raise InvalidRequest(validation_message(e, "policy_params")) from None
    if ensemble is not None:
        check_models(validated, ensemble, name)
    return validated


def build_policy(
    name: str, params: Mapping[str, object] | None = None, ensemble: tuple[str, ...] | None = None
) -> Policy:
    """A ready policy `name` with `params`; see the module docstring for the errors."""
    validated = validate_policy_params(name, params, ensemble)
    return _REGISTRY[name].build(validated)


# Makes a policy for a request: (policy name, params, ensemble) -> Policy. A `PolicyCache`
# builds each (name, parameters) once; a deployment may route some names to hosted policies.
PolicyResolver = Callable[[str, Mapping[str, object], tuple[str, ...]], Policy]


class PolicyCache:
    """Policies built once per (name, validated parameters), shared by every request that
    names them (a policy is stateless between turns and safe to share). The request's
    ensemble is checked against the parameters on every call. At most `size` are kept,
    least recently used dropped first."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._built: OrderedDict[tuple[str, str], Policy] = OrderedDict()

    def __call__(
        self, name: str, params: Mapping[str, object] | None, ensemble: tuple[str, ...]
    ) -> Policy:
        validated = validate_policy_params(name, params, ensemble)
        key = (name, validated.model_dump_json())
        policy = self._built.get(key)
        if policy is None:
            policy = self._built[key] = _REGISTRY[name].build(validated)
            while len(self._built) > self.size:
                self._built.popitem(last=False)
        self._built.move_to_end(key)
        return policy


register_policy("fixed", FixedParams, Fixed)
register_policy("round_robin", RoundRobinParams, RoundRobin)
register_policy("random_switch", RandomSwitchParams, RandomSwitch)
register_policy("rule_router", RuleRouterParams, RuleRouter)
register_policy("defer", DeferParams, Defer)
register_policy("random_defer", RandomDeferParams, RandomDefer)
register_policy("w2s_search", W2SSearchParams, W2SSearch)
register_policy("replay_switch", ReplaySwitchParams, ReplaySwitch)
register_policy("trained_router", TrainedRouterParams, TrainedRouter)
register_policy("switch", SwitchParams, Switch)
