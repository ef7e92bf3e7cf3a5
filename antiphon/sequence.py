"""Per-request sequence types: the prompt, the segments in order, the budgets, the status.

`SequenceState` is the coordinator's source of truth for a request (model sessions are caches
of it and can be rebuilt from it). It is frozen: the turn loop replaces it with the state that
`antiphon.coordinator.commit.apply` returns, so a state can be handed around (to a policy as a
`SequenceView`, to an executor that plans the next write) without anyone changing it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Literal

from antiphon.messages import FinishReason as ModelFinishReason

# Why a whole sequence ended. "eos": a model wrote its end token; "stop": a stop string
# appeared (the text is cut before it); "length": the token budget is spent or a writer's
# context is full; "policy": the policy returned `Finish`.
SequenceFinishReason = Literal["eos", "stop", "length", "policy"]

# What produced a segment. "write": a model wrote it for a WriteSegment decision, or the base
# model up to its gate; "deferred": the assistant wrote it after the base model's gate asked
# for help; "search": a chunk of the beam a search committed.
SegmentKind = Literal["write", "deferred", "search"]


class SequenceStatus(enum.IntEnum):
    """Ordered: a status only moves forward."""

    WAITING = 0  # created, no turn run yet
    RUNNING = 1  # turns in progress
    FINISHED = 2  # ended normally; finish_reason says why
    FAILED = 3  # ended by an error or a cancel; the segments so far are still valid


@dataclass(frozen=True, slots=True)
class Segment:
    """One contiguous piece of the response, written by one model."""

    model: str  # name of the model that wrote it
    token_ids: tuple[int, ...]  # in that model's tokenizer (eos included if it wrote one)
    text: str  # its text; the response is the concatenation of the segments' texts
    logprobs: tuple[float, ...]  # log p of each token under the writing model's sampling
    turn: int  # index of the policy decision that produced it
    kind: SegmentKind = "write"
    model_finish: ModelFinishReason = "length"  # why the model stopped writing this segment
    # the writer's deferral gate before each token (one more when it stopped at its gate);
    # empty when the writer carries no gate
    gates: tuple[float, ...] = ()
    gate: str = ""  # the fingerprint of the gate that gave them (a served gate can change)
    # per token, when asked for: the writer's most likely tokens there, (id, log p) best first
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()


@dataclass(frozen=True, slots=True)
class SequenceView:
    """What a policy sees before a turn: the committed sequence and the budget."""

    request_id: str
    prompt: str  # the prompt text (chat already rendered by the caller)
    models: tuple[str, ...]  # the ensemble, in request order
    segments: tuple[Segment, ...]  # committed segments, in order
    turn: int  # index of the decision being asked for (0 for the first)
    tokens_written: int  # committed response tokens, each counted in its writer's tokenizer
    max_tokens: int  # the response's token budget
    seed: int | None  # the request's seed, for policies that sample

    @property
    def tokens_left(self) -> int:
        return max(0, self.max_tokens - self.tokens_written)

    @property
    def text(self) -> str:
        """The response so far (committed segments only)."""
        return "".join(s.text for s in self.segments)


@dataclass(frozen=True, slots=True)
class SequenceState:
    """Everything the coordinator knows about one request's response."""

    request_id: str
    prompt: str  # prompt text; each model's session starts from it in its own tokenizer
    models: tuple[str, ...]  # the ensemble, in request order
    max_tokens: int  # response token budget (sum of segment lengths)
    stop: tuple[str, ...] = ()  # stop strings; the response is cut before the first one
    seed: int | None = None  # request seed (sampling and seeded policies derive from it)
    segments: tuple[Segment, ...] = ()  # committed, in order
    turn: int = 0  # decisions taken so far
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: SequenceFinishReason | None = None

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments)

    @property
    def tokens_written(self) -> int:
        return sum(len(s.token_ids) for s in self.segments)

    @property
    def tokens_left(self) -> int:
        return max(0, self.max_tokens - self.tokens_written)

    @property
    def done(self) -> bool:
        return self.status >= SequenceStatus.FINISHED

    def view(self) -> SequenceView:
        return SequenceView(
            request_id=self.request_id,
            prompt=self.prompt,
            models=self.models,
            segments=self.segments,
            turn=self.turn,
            tokens_written=self.tokens_written,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )

    def finished(self, reason: SequenceFinishReason) -> SequenceState:
        """This state ended for `reason` (a state already ended keeps its reason)."""
        if self.done:
            return self
        return replace(self, status=SequenceStatus.FINISHED, finish_reason=reason)

    def failed(self) -> SequenceState:
        return self if self.done else replace(self, status=SequenceStatus.FAILED)
