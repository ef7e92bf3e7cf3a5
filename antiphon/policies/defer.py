"""Co-LLM deferral (`defer`): the base model writes until its learned gate reaches eta, then
the assistant writes (strategy "defer") or the token is the argmax of the two models' mix
(1-g) p_base + g p_asst (strategy "compose", same vocabulary only).

The gate lives next to the base checkpoint (`antiphon.actors.gate`, trained by
`antiphon.training.gate_training`); the engine stops the base's draft before the first token
whose gate reaches the threshold, inside one generate call. eta can warm up over the
response's first tokens, as in the reference code: the threshold goes from `warmup_start` to
eta over `warmup_steps` tokens (linear, exponential or cosine), eta after them.

`random_defer` is the method's control: deferral at a fixed rate, blind to the content.
"""

from __future__ import annotations

import math
import random
from typing import Literal

from pydantic import Field

from antiphon.policies.base import Decision, WriteSegment, WriteUntilDeferral
from antiphon.policies.baselines import RULE_VERSION, PolicyParams
from antiphon.sequence import SequenceView

WarmupSchedule = Literal["constant", "linear", "exponential", "cosine"]


def warmup_threshold(step: int, schedule: str, steps: int, start: float, eta: float) -> float:
    """The gate threshold before response token `step` (0-based)."""
    if schedule == "constant" or step >= steps:
        return eta
    frac = step / steps
    if schedule == "linear":
        return start + (eta - start) * frac
    if schedule == "exponential":  # start * (eta / start) ** frac, defined for start > 0
        return start * (eta / start) ** frac if start > 0 and eta > 0 else eta
    return eta + (start - eta) / 2 * (math.cos(math.pi * frac) + 1)  # cosine


def warmup_thresholds(
    first: int, n: int, schedule: str, steps: int, start: float, eta: float
) -> tuple[float, ...]:
    """Thresholds of response tokens first .. first+n-1 that the warm-up still covers (none
    once the response is past it: eta from there)."""
    last = min(first + n, steps) if schedule != "constant" else first
    return tuple(warmup_threshold(i, schedule, steps, start, eta) for i in range(first, last))


class DeferParams(PolicyParams):
    base: str = Field(min_length=1, description="Model that writes and carries the gate.")
    assistant: str = Field(min_length=1, description="Model the base defers to.")
    eta: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Defer at the first token whose gate >= eta."
    )
    strategy: Literal["defer", "compose"] = Field(
        default="defer",
        description="defer: the assistant writes the token(s); compose: argmax of "
        "(1-g) p_base + g p_assistant (models that share a vocabulary).",
    )
    segment_len: int = Field(default=64, ge=1, description="Most base tokens per turn.")
    assistant_tokens: int = Field(
        default=1, ge=1, description="Tokens the assistant writes per deferral (strategy defer)."
    )
    warmup_schedule: WarmupSchedule = Field(
        default="constant", description="How the threshold moves from warmup_start to eta."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Response tokens the warm-up spans.")
    warmup_start: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Threshold at the response's first token."
    )

    def referenced_models(self) -> tuple[str, ...]:
        return (self.base, self.assistant)


class Defer:
    """Every turn: the base writes until its gate fires, then the assistant helps."""

    name = "defer"
    version = RULE_VERSION  # the gate's weights are the base's; its fingerprint is logged

    def __init__(self, params: DeferParams) -> None:
        self.params = params

    async def decide(self, view: SequenceView) -> Decision:
        p = self.params
        return WriteUntilDeferral(
            p.base, p.assistant, p.eta, p.segment_len, p.assistant_tokens, p.strategy,
            p.warmup_schedule, p.warmup_steps, p.warmup_start,
        )  # fmt: skip


class RandomDeferParams(PolicyParams):
    base: str = Field(min_length=1, description="Model that writes when not deferring.")
    assistant: str = Field(min_length=1, description="Model deferred to.")
    rate: float = Field(ge=0.0, le=1.0, description="Chance of deferring each token.")
    assistant_tokens: int = Field(default=1, ge=1, description="Tokens per deferral.")

    def referenced_models(self) -> tuple[str, ...]:
        return (self.base, self.assistant)


class RandomDefer:
    """Co-LLM's control: defer each token with a fixed chance, blind to the content. The base
    writes a geometric number of tokens (the tokens before the next deferral), then the
    assistant writes `assistant_tokens`. Seeded by the request's seed, prompt and turn."""

    name = "random_defer"
    version = RULE_VERSION

    def __init__(self, params: RandomDeferParams) -> None:
        self.params = params

    async def decide(self, view: SequenceView) -> Decision:
        p = self.params
        if view.segments and view.segments[-1].model == p.base:
            return WriteSegment(p.assistant, p.assistant_tokens)
        rng = random.Random(f"random_defer:{view.seed}:{view.turn}:{view.prompt}")
        if p.rate <= 0.0:
            run = view.tokens_left
        elif p.rate >= 1.0:
            run = 0
        else:  # tokens before the first deferral, each token deferred with chance `rate`
            run = int(math.log(1.0 - rng.random()) / math.log(1.0 - p.rate))
        if run == 0:
            return WriteSegment(p.assistant, p.assistant_tokens)
        return WriteSegment(p.base, max(1, min(run, view.tokens_left)))
