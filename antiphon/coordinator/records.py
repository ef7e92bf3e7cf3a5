"""What the coordinator logs: one record per committed segment, one per request, and the
clients' feedback; and the `TurnSink` it sends them to (the turn log, `antiphon.training`).

`turn_records` assembles a request's records from its state and the decisions that made it:
each segment's record names the policy version carried by the decision of its turn.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Protocol

from antiphon.messages import ModelInfo
from antiphon.policies.base import Decision
from antiphon.sequence import SequenceState

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One committed segment: who wrote it, on whose decision, how long it took."""

    kind: ClassVar[str] = "turn"
    request_id: str
    turn: int  # index of the policy decision
    segment: int  # index of the segment in the response (a deferral turn makes two)
    policy: str  # policy name
    policy_version: str
    decision: dict[str, Scalar]  # the decision's kind and fields, e.g. {"kind": "write", ...}
    model: str  # writer
    segment_kind: str  # "write" | "deferred" | "search"
    token_ids: tuple[int, ...]  # in the writer's tokenizer
    text: str
    logprobs: tuple[float, ...]
    model_finish: str  # why the writer stopped: length | stop | eos | gate
    policy_ms: float  # time waiting for the decision
    model_ms: float  # time in model calls for this turn (sync, generate, score)
    # the turn all in, from asking the policy to its segments streamed out (so wall_ms -
    # model_ms is the turn's coordination: policy, state, streaming); 0 in older logs
    wall_ms: float = 0.0
    time: float = field(default_factory=time.time)  # unix seconds when committed
    # the writer's deferral gate before each token (one more if it stopped at the gate), and
    # the fingerprint of that gate: what an online gate trainer learns from; empty without
    gates: tuple[float, ...] = ()
    gate: str = ""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Written once per request, after its last turn record: the query and the outcome."""

    kind: ClassVar[str] = "request"
    request_id: str
    prompt: str
    models: tuple[str, ...]
    policy: str
    policy_version: str
    policy_params: dict[str, object]  # as the request gave them (JSON values)
    num_turns: int
    num_segments: int  # the request's turn records carry segment = 0 .. num_segments-1
    text: str  # the final response
    finish_reason: str | None  # None when the request failed
    error: str | None  # error class and message when it failed
    time: float = field(default_factory=time.time)
    coordinator: str = ""  # the coordinator replica that ran it ("" outside Serve)


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """A client's reward for a request (POST /v1/feedback)."""

    kind: ClassVar[str] = "feedback"
    request_id: str
    reward: float
    comment: str = ""
    time: float = field(default_factory=time.time)


Record = TurnRecord | RequestRecord | FeedbackRecord


class TurnSink(Protocol):
    """Where a coordinator sends its records (a local file, or the turn log actor)."""

    async def write(self, records: list[Record]) -> None:
        """Send a batch; it may land after this returns."""
        ...

    async def feedback(self, record: FeedbackRecord) -> None:
        """Log a client's reward once it has landed; NotFound when the log holds no request
        of its id."""
        ...

    async def flush(self) -> None:
        """Wait until everything sent so far has landed; raise if some of it failed to."""
        ...

    async def problem(self) -> str | None:
        """Why records cannot land right now, or None when they can (for /health)."""
        ...


@dataclass(frozen=True, slots=True)
class TurnTiming:
    """Where one turn's time went, in milliseconds."""

    policy_ms: float = 0.0  # waiting for the decision
    model_ms: float = 0.0  # running it (model calls)
    wall_ms: float = 0.0  # the whole turn, its segments streamed out included


def turn_records(
    state: SequenceState,
    policy: str,
    decisions: Mapping[int, Decision],
    timings: Mapping[int, TurnTiming],
    commit_times: Sequence[float],
    infos: Mapping[str, ModelInfo],
) -> list[TurnRecord]:
    """One record per committed segment, each with the decision of its turn and its version,
    and the fingerprint of its writer's gate (`infos`: the request's models)."""
    records = []
    for i, seg in enumerate(state.segments):
        decision = decisions.get(seg.turn)
        timing = timings.get(seg.turn, TurnTiming())
        records.append(
            TurnRecord(
                request_id=state.request_id,
                turn=seg.turn,
                segment=i,
                policy=policy,
                policy_version=decision.version if decision is not None else "",
                decision=decision_fields(decision),
                model=seg.model,
                segment_kind=seg.kind,
                token_ids=seg.token_ids,
                text=seg.text,
                logprobs=seg.logprobs,
                model_finish=seg.model_finish,
                policy_ms=timing.policy_ms,
                model_ms=timing.model_ms,
                wall_ms=timing.wall_ms,
                time=commit_times[i],
                gates=seg.gates,
                # the gate of the call that wrote it; else the writer's (it read no gate)
                gate=seg.gate or infos[seg.model].gate_fingerprint,
            )
        )
    return records


FAILED_TEXT_KEPT = 1024  # characters of a failed request's prompt and error that are logged


def preview(text: str, limit: int = FAILED_TEXT_KEPT) -> str:
    """`text`, or its first `limit` characters and how many more there were."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more characters]"


def request_record(
    state: SequenceState,
    policy: str,
    policy_version: str,
    policy_params: Mapping[str, object],
    error: BaseException | None,
) -> RequestRecord:
    """The record that closes a request's records: its query, how it ended, what decided.
    A failed request's prompt and error are cut to a preview: they serve diagnosis, not
    training, and a rejected oversized prompt must not grow the log by its size."""
    return RequestRecord(
        request_id=state.request_id,
        prompt=state.prompt if error is None else preview(state.prompt),
        models=state.models,
        policy=policy,
        policy_version=policy_version,
        policy_params=dict(policy_params),
        num_turns=state.turn,
        num_segments=len(state.segments),
        text=state.text,
        finish_reason=state.finish_reason,
        error=None if error is None else preview(f"{type(error).__name__}: {error}"),
    )


def decision_fields(decision: Decision | None) -> dict[str, Scalar]:
    """A decision as a flat record: its kind and fields (the version is logged on its own)."""
    if decision is None:
        return {}
    fields = {k: v for k, v in asdict(decision).items() if k != "version"}
    return {"kind": decision.kind, **fields}
