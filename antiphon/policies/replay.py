"""`replay_switch`: replays a given prefix of decisions, then switches at random (or lets a
switcher decide) -- how the switcher's rollouts rebuild a cut prefix and complete each branch
through the coordinator.

    build_policy("replay_switch", {"prefix_models": ["a", "b"], "prefix_tokens": [8, 3],
                                   "segment_len": 8, "seed": 5}, ensemble=("a", "b"))

Turn t < len(prefix) writes prefix_tokens[t] tokens with prefix_models[t]; later turns pick a
model uniformly at random (seeded by (seed, turn), as `random_switch`), or, with
`completion_switcher`, as that `switch` policy picks: on-policy completions, so a branch is
labelled by what happens when the switcher itself writes the rest. Under the same request
seed the coordinator derives the same sampling seed per turn, so a replayed prefix reproduces
the text of the run it was cut from, greedy or sampled. After the prefix, the turns sample from
`seed` instead (where given): completions under different seeds are independent samples of the
rest, not one text repeated, and one seed across branches gives them common random numbers.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import ClassVar

from pydantic import Field, model_validator

from antiphon.policies.base import Decision, WriteSegment
from antiphon.policies.baselines import RULE_VERSION, PolicyParams
from antiphon.policies.switcher import Switch, SwitchParams
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
        default=None,
        description="Seed of the random choices and of sampling after the prefix; default: "
        "the request's seed.",
    )
    config_only: ClassVar[frozenset[str]] = frozenset({"completion_switcher"})  # names a path

    completion_switcher: SwitchParams | None = Field(
        default=None,
        description="After the prefix, let this switch policy pick the writers instead of "
        "random switching.",
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
        inner = self.completion_switcher.referenced_models() if self.completion_switcher else ()
        return tuple(dict.fromkeys((*self.prefix_models, *inner)))

    def referenced_deployments(self) -> tuple[str, ...]:
        s = self.completion_switcher
        return s.referenced_deployments() if s is not None else ()


class ReplaySwitch:
    """The given decisions first, then uniform random switching or the completion switcher."""

    name = "replay_switch"
    version = RULE_VERSION

    def __init__(self, params: ReplaySwitchParams) -> None:
        self.params = params
        switcher = params.completion_switcher
        if switcher is not None and switcher.seed is None:  # one seed per completion
            switcher = switcher.model_copy(update={"seed": params.seed})
        self.completion = Switch(switcher) if switcher is not None else None
        if self.completion is not None:
            self.version = self.completion.version  # the decisions are the switcher's

    async def decide(self, view: SequenceView) -> Decision:
        p = self.params
        if view.turn < len(p.prefix_models):
            return WriteSegment(p.prefix_models[view.turn], p.prefix_tokens[view.turn])
        if self.completion is not None:
            decision = await self.completion.decide(view)
            if isinstance(decision, WriteSegment):
                decision = replace(decision, sample_seed=p.seed)
            return decision
        seed = p.seed if p.seed is not None else (view.seed or 0)
        rng = random.Random(f"replay_switch:{seed}:{view.turn}")
        return WriteSegment(rng.choice(view.models), p.segment_len, sample_seed=p.seed)
