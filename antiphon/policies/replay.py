"""`replay_switch`: replays a given prefix of decisions, then switches at random -- how the
switcher's rollouts rebuild a cut prefix and complete each branch through the coordinator.

    build_policy("replay_switch", {"prefix_models": ["a", "b"], "prefix_tokens": [8, 3],
                                   "segment_len": 8, "seed": 5}, ensemble=("a", "b"))

Turn t < len(prefix) writes prefix_tokens[t] tokens with prefix_models[t]; later turns pick a
model uniformly at random (seeded by (seed, turn), as `random_switch`). Under the same request
seed the coordinator derives the same sampling seed per turn, so a replayed prefix reproduces
the text of the run it was cut from, greedy or sampled.
"""

from __future__ import annotations

import random

from pydantic import Field, model_validator

from antiphon.policies.base import Decision, WriteSegment
from antiphon.policies.baselines import RULE_VERSION, PolicyParams
from antiphon.sequence import SequenceView


class ReplaySwitchParams(PolicyParams):
    prefix_models: tuple[str, ...] = Field(
        default=(), description="Writer of each replayed turn, in order."
    )
    prefix_tokens: tuple[int, ...] = Field(
        default=(), description="Tokens of each replayed turn (same length as prefix_models)."
    )
    segment_len: int = Field(default=32, ge=1, description="Tokens per segment after the prefix.")
    seed: int | None = Field(
        default=None, description="Seed of the random choices; default: the request's seed."
    )

    @model_validator(mode="after")
    def _same_length(self) -> ReplaySwitchParams:
        if len(self.prefix_models) != len(self.prefix_tokens):
            raise ValueError(
                f"prefix_models has {len(self.prefix_models)} entries, prefix_tokens "
                f"{len(self.prefix_tokens)}: they must match"
            )
        if any(t < 1 for t in self.prefix_tokens):
            raise ValueError("prefix_tokens must all be >= 1")
        return self

    def referenced_models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.prefix_models))


class ReplaySwitch:
    """The given decisions first, then uniform random switching."""

    name = "replay_switch"
    version = RULE_VERSION

    def __init__(self, params: ReplaySwitchParams) -> None:
        self.params = params

    async def decide(self, view: SequenceView) -> Decision:
        p = self.params
        if view.turn < len(p.prefix_models):
            return WriteSegment(p.prefix_models[view.turn], p.prefix_tokens[view.turn])
        seed = p.seed if p.seed is not None else (view.seed or 0)
        rng = random.Random(f"replay_switch:{seed}:{view.turn}")
        return WriteSegment(rng.choice(view.models), p.segment_len)
