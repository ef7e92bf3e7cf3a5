"""Policy registry: a policy name -> its parameter model and its constructor.

    policy = build_policy("round_robin", {"segment_len": 8}, ensemble=("base", "aligned"))

An unknown name raises `NotFound`; bad parameters raise `InvalidRequest` naming the field
(`policy_params.segment_len: ...`); parameters naming a model outside the ensemble raise
`InvalidRequest` too. Later policies (the learned switcher, ...) join with `register_policy`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from antiphon.coordinator.request import validation_message
from antiphon.errors import InvalidRequest, NotFound
from antiphon.policies.base import Policy
from antiphon.policies.baselines import (
    ChunkSearch,
    ChunkSearchParams,
    Deferral,
    DeferralParams,
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


register_policy("fixed", FixedParams, Fixed)
register_policy("round_robin", RoundRobinParams, RoundRobin)
register_policy("random_switch", RandomSwitchParams, RandomSwitch)
register_policy("rule_router", RuleRouterParams, RuleRouter)
register_policy("deferral", DeferralParams, Deferral)
register_policy("chunk_search", ChunkSearchParams, ChunkSearch)

# Policies with their own modules register themselves on import (kept last: they import this).
import antiphon.policies.replay  # noqa: E402, F401
import antiphon.policies.router  # noqa: E402, F401
import antiphon.policies.switcher  # noqa: E402, F401
