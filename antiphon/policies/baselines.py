"""Rule policies, each with its pydantic parameters: fixed, round_robin, random_switch,
rule_router (the baselines of Switch Generation). Co-LLM's `defer` is in
`antiphon.policies.defer`, weak-to-strong search's `w2s_search` in `antiphon.policies.search`.

Every policy here is stateless between turns: it decides from the view alone, so one
instance serves any number of concurrent requests and coordinator replicas agree.
"""

from __future__ import annotations

import random
import re
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from antiphon.errors import InvalidRequest
from antiphon.policies.base import Decision, WriteSegment
from antiphon.sequence import SequenceView

RULE_VERSION = "1"  # rule policies have no weights; bump when a rule's behaviour changes


class PolicyParams(BaseModel):
    """Base of every policy's parameters: unknown keys are errors, frozen after validation."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    # Parameters that name files, hub ids, deployments or code (a regular expression is a
    # program): only the server's config sets them, never a request's policy_params.
    config_only: ClassVar[frozenset[str]] = frozenset()

    def referenced_models(self) -> tuple[str, ...]:
        """Model names these parameters mention (checked against the ensemble)."""
        return ()

    def referenced_deployments(self) -> tuple[str, ...]:
        """Model deployments of the same app these parameters call (e.g. a switcher's);
        an app config checks that it lists them among its models."""
        return ()


def _pick_from(view: SequenceView, names: tuple[str, ...] | None) -> tuple[str, ...]:
    return names if names else view.models


# ----- fixed ---------------------------------------------------------------------------


class FixedParams(PolicyParams):
    model: str = Field(min_length=1, description="The one model that writes everything.")
    segment_len: int = Field(default=32, ge=1, description="Tokens per segment (streaming unit).")

    def referenced_models(self) -> tuple[str, ...]:
        return (self.model,)


class Fixed:
    """One model writes the whole response (the single-model baseline)."""

    name = "fixed"
    version = RULE_VERSION

    def __init__(self, params: FixedParams) -> None:
        self.params = params

    async def decide(self, view: SequenceView) -> Decision:
        return WriteSegment(self.params.model, self.params.segment_len)


# ----- round_robin ----------------------------------------------------------------------


class RoundRobinParams(PolicyParams):
    segment_len: int = Field(default=32, ge=1, description="Tokens per segment.")
    order: tuple[str, ...] = Field(
        default=(), description="Models in turn order; empty: the ensemble's order."
    )
    start: int = Field(default=0, ge=0, description="Index in the order of the first writer.")

    def referenced_models(self) -> tuple[str, ...]:
        return self.order


class RoundRobin:
    """Models take turns in a fixed order, segment_len tokens each."""

    name = "round_robin"
    version = RULE_VERSION

    def __init__(self, params: RoundRobinParams) -> None:
        self.params = params

    async def decide(self, view: SequenceView) -> Decision:
        order = _pick_from(view, self.params.order)
        writer = order[(self.params.start + view.turn) % len(order)]
        return WriteSegment(writer, self.params.segment_len)


# ----- random_switch --------------------------------------------------------------------


class RandomSwitchParams(PolicyParams):
    segment_len: int = Field(default=32, ge=1, description="Tokens per segment.")
    seed: int | None = Field(
        default=None, description="Seed of the choices; default: the request's seed (else 0)."
    )
    candidates: tuple[str, ...] = Field(
        default=(), description="Models to pick from; empty: the whole ensemble."
    )

    def referenced_models(self) -> tuple[str, ...]:
        return self.candidates


class RandomSwitch:
    """Before each segment, a model drawn uniformly at random; the same seed repeats the draws.

    The draw of turn t depends only on (seed, t), so it is the same in any replica and after
    a restart."""

    name = "random_switch"
    version = RULE_VERSION

    def __init__(self, params: RandomSwitchParams) -> None:
        self.params = params

    async def decide(self, view: SequenceView) -> Decision:
        seed = self.params.seed if self.params.seed is not None else (view.seed or 0)
        rng = random.Random(f"random_switch:{seed}:{view.turn}")
        return WriteSegment(
            rng.choice(_pick_from(view, self.params.candidates)), self.params.segment_len
        )


# ----- rule_router ----------------------------------------------------------------------


class RouteRule(PolicyParams):
    pattern: str = Field(min_length=1, description="Regular expression searched in the prompt.")
    model: str = Field(min_length=1, description="Model that writes when the pattern matches.")
    ignore_case: bool = Field(default=True, description="Match without regard to case.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class RuleRouterParams(PolicyParams):
    config_only: ClassVar[frozenset[str]] = frozenset({"rules"})  # patterns run on our CPU

    rules: tuple[RouteRule, ...] = Field(
        default=(), description="Tried in order; the first whose pattern matches picks the model."
    )
    default: str = Field(min_length=1, description="Model when no rule matches.")
    segment_len: int = Field(default=32, ge=1, description="Tokens per segment (streaming unit).")

    def referenced_models(self) -> tuple[str, ...]:
        return (*(r.model for r in self.rules), self.default)


class RuleRouter:
    """One model for the whole response, chosen from the prompt by the first matching rule."""

    name = "rule_router"
    version = RULE_VERSION

    def __init__(self, params: RuleRouterParams) -> None:
        self.params = params
        self._rules = [
            (re.compile(r.pattern, re.IGNORECASE if r.ignore_case else 0), r.model)
            for r in params.rules
        ]

    def route(self, prompt: str) -> str:
        for pattern, model in self._rules:
            if pattern.search(prompt):
                return model
        return self.params.default

    async def decide(self, view: SequenceView) -> Decision:
        return WriteSegment(self.route(view.prompt), self.params.segment_len)


def check_models(params: PolicyParams, ensemble: tuple[str, ...], policy: str) -> None:
    """Raise InvalidRequest if the parameters name a model outside the ensemble."""
    for name in params.referenced_models():
        if name not in ensemble:
            raise InvalidRequest(
                f"policy_params of {policy!r} name model {name!r}, which is not in the "
                f"ensemble {list(ensemble)}"
            )
