"""The policy interface and the decisions a policy can return.

A policy is one async method, `decide(view) -> Decision`, plus a `name` and a `version` that
go into the turn log. The coordinator asks it once per turn and runs the decision:

- `WriteSegment(model, max_tokens)`: one model writes up to max_tokens (switcher, baselines).
- `WriteUntilDeferral(base, assistant, gate_threshold, max_tokens, assistant_tokens,
  strategy, warmup...)`: the base model writes until its gate reaches the threshold (decided
  next to the model, inside one generate call), then the assistant writes `assistant_tokens`
  tokens, or the token is chosen from both models' mixture (Co-LLM).
- `SearchStep(proposer, tuned, untuned, width, successors, chunk_len)`: one step of
  chunk-level beam search: each beam is forked `successors` ways, each child samples
  `chunk_len` tokens from the proposer, children are scored by log p_tuned - log p_untuned and
  the best `width` survive (weak-to-strong search).
- `Finish()`: end the response now.

Decisions are small frozen values, validated on creation, so they cross a Ray boundary as is.
Each carries the `version` of the policy that made it (`decide` stamps it), and the turn
records take it from there: a policy whose weights change between two decisions labels each
with its own. Each says which models it uses (`models()`); the coordinator runs each kind
with its own executor (`antiphon.coordinator.executors`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Protocol, runtime_checkable

from antiphon.errors import InvalidRequest
from antiphon.sequence import SequenceView


def _positive(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{what} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class WriteSegment:
    kind: ClassVar[str] = "write"
    model: str  # who writes
    max_tokens: int  # at most this many tokens (the request budget may cut it shorter)
    # False: the writer's end token ends only this segment (it is dropped from the sequence)
    # and the policy picks the next writer; a writer with nothing but its end token to add
    # still ends the response, so every turn makes progress.
    end_on_eos: bool = True
    version: str = ""  # of the policy that made it
    # True: once this segment is written its writer drafts the next one while the policy
    # decides; the draft is kept if the same decision comes (`executors/speculate.py`)
    speculate: bool = False
    # The seed each turn's sampling seed is derived from, in place of the request's: lets
    # completions of one replayed prefix sample apart (`replay_switch`). None: the request's.
    sample_seed: int | None = None

    def __post_init__(self) -> None:
        _positive(self.max_tokens, "WriteSegment.max_tokens")

    def models(self) -> tuple[str, ...]:
        return (self.model,)


@dataclass(frozen=True, slots=True)
class WriteUntilDeferral:
    kind: ClassVar[str] = "defer"
    base: str  # writes until its gate >= gate_threshold
    assistant: str  # then writes assistant_tokens tokens
    gate_threshold: float  # in [0, 1]; the engine stops before the first token at or above it
    max_tokens: int  # at most this many base tokens in this turn
    assistant_tokens: int = 1  # tokens the assistant writes per deferral
    # "defer": the assistant writes; "compose": the token is the argmax of
    # (1-g) p_base + g p_assistant at the gated position
    strategy: str = "defer"
    # the threshold warms up from warmup_start to gate_threshold over the response's first
    # warmup_steps tokens ("constant": no warm-up); `antiphon.policies.defer`
    warmup_schedule: str = "constant"
    warmup_steps: int = 0
    warmup_start: float = 1.0
    version: str = ""  # of the policy that made it

    def models(self) -> tuple[str, ...]:
        return (self.base, self.assistant)

    def __post_init__(self) -> None:
        _positive(self.max_tokens, "WriteUntilDeferral.max_tokens")
        _positive(self.assistant_tokens, "WriteUntilDeferral.assistant_tokens")
        for what, value in (("gate_threshold", self.gate_threshold),
                            ("warmup_start", self.warmup_start)):  # fmt: skip
            if not 0.0 <= value <= 1.0:
                raise InvalidRequest(f"WriteUntilDeferral.{what} must be in [0, 1], got {value!r}")
        if self.strategy not in ("defer", "compose"):
            raise InvalidRequest(
                f"WriteUntilDeferral.strategy must be 'defer' or 'compose', got {self.strategy!r}"
            )
        if self.warmup_schedule not in ("constant", "linear", "exponential", "cosine"):
            raise InvalidRequest(
                "WriteUntilDeferral.warmup_schedule must be constant, linear, exponential or "
                f"cosine, got {self.warmup_schedule!r}"
            )
        if self.warmup_steps != 0:
            _positive(self.warmup_steps, "WriteUntilDeferral.warmup_steps")


@dataclass(frozen=True, slots=True)
class SearchStep:
    kind: ClassVar[str] = "search"
    proposer: str  # the (large) model every token is sampled from
    tuned: str  # small tuned guide: + log p
    untuned: str  # small untuned guide: - log p
    width: int  # W: beams kept after the step
    successors: int  # K: children sampled per beam (W*K from the prompt on the first step)
    chunk_len: int  # L: proposer tokens per chunk
    temperature: float = 1.0  # sampling temperature of the proposer (> 0: children must differ)
    version: str = ""  # of the policy that made it

    def models(self) -> tuple[str, ...]:
        return (self.proposer, self.tuned, self.untuned)

    def same_search(self, other: SearchStep) -> bool:
        """Both step the same search: equal but for the version that decided them."""
        return replace(self, version="") == replace(other, version="")

    def __post_init__(self) -> None:
        _positive(self.width, "SearchStep.width")
        _positive(self.successors, "SearchStep.successors")
        _positive(self.chunk_len, "SearchStep.chunk_len")
        if len({self.proposer, self.tuned, self.untuned}) < 3:
            raise InvalidRequest(
                "SearchStep needs three different models (proposer, tuned, untuned), got "
                f"{[self.proposer, self.tuned, self.untuned]}"
            )
        if not self.temperature > 0.0:
            raise InvalidRequest(f"SearchStep.temperature must be > 0, got {self.temperature!r}")


@dataclass(frozen=True, slots=True)
class Finish:
    kind: ClassVar[str] = "finish"
    version: str = ""  # of the policy that made it

    def models(self) -> tuple[str, ...]:
        return ()


Decision = WriteSegment | WriteUntilDeferral | SearchStep | Finish


@runtime_checkable
class Policy(Protocol):
    """Who writes next. `decide` must not mutate the view; it may be called concurrently for
    different requests, so per-request state lives in the view, not in the policy."""

    name: str  # registry name, logged with every turn
    version: str  # changes whenever the policy's behaviour (weights, rules) changes

    async def decide(self, view: SequenceView) -> Decision: ...


async def decide(policy: Policy, view: SequenceView) -> Decision:
    """The policy's decision, carrying the version that made it: its own, if it names one
    (a hosted policy's decisions come stamped by the actor), else the policy's version now."""
    decision = await policy.decide(view)
    return decision if decision.version else replace(decision, version=policy.version)
