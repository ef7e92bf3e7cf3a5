"""`WriteSegment`: one model writes up to max_tokens. Also `Finish`, which writes nothing.

`write_segment` is the one way a model writes a segment (the deferral executor uses it for
both its writers): capped by the budget and by the room left in the writer's context (a full
context ends the response with "length"; a prompt that alone fills it is `PromptTooLong`),
completed to a whole UTF-8 character, and, where an end token should end only the segment,
with that token dropped from the sequence and cut off the writer's session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from antiphon.coordinator.commit import Outcome, apply
from antiphon.coordinator.executors.base import ExecutionContext, Stateless
from antiphon.coordinator.executors.speculate import Draft, next_turn
from antiphon.errors import PromptTooLong
from antiphon.messages import Generation
from antiphon.policies.base import Finish, WriteSegment
from antiphon.sequence import Segment, SegmentKind, SequenceState

MAX_CHAR_COMPLETION_TOKENS = 3  # extra tokens allowed to finish a split UTF-8 character


async def write_segment(
    ctx: ExecutionContext,
    state: SequenceState,
    name: str,
    max_tokens: int,
    kind: SegmentKind,
    *,
    end_on_eos: bool = True,
) -> Outcome:
    """`name` writes up to max_tokens after the state; the outcome holds its segment (none if
    it wrote nothing)."""
    outcome, _ = await draft_segment(ctx, state, name, max_tokens, kind, end_on_eos=end_on_eos)
    return outcome


async def draft_segment(
    ctx: ExecutionContext,
    state: SequenceState,
    name: str,
    max_tokens: int,
    kind: SegmentKind,
    *,
    gate: float | None = None,
    gate_warmup: tuple[float, ...] = (),
    end_on_eos: bool = True,
    sample_seed: int | None = None,
) -> tuple[Outcome, Generation | None]:
    """`write_segment` with the writer's gate: it stops before the first token whose gate
    reaches `gate` (`gate_warmup`: the thresholds of its first tokens). Also returns the
    generate call's result (its gates; None when the writer had no room to write), which
    says whether the gate stopped it, even before its first token. `sample_seed`: as
    `WriteSegment.sample_seed`."""
    ms = ctx.sessions[name]
    room = ms.context_room(state)
    if room <= 0 and not state.segments:
        raise PromptTooLong(
            f"the prompt is {len(ms.prompt_ids())} tokens; model {name!r} has a context of "
            f"{ms.info.max_context} tokens and no room left to write"
        )
    if room <= 0:  # the response filled the writer's context: it cannot grow
        return Outcome(finish="length"), None
    limit = min(state.tokens_left, room)
    params = ctx.sampling(
        name, min(max_tokens, limit), seed_parts=(state.turn, 0), sample_seed=sample_seed,
        gate_threshold=gate, gate_warmup=gate_warmup[:limit],
    )  # fmt: skip
    gen = await ms.generate(state, params)
    ids, text, logprobs = list(gen.token_ids), gen.text, list(gen.logprobs)
    top = list(gen.top_logprobs)
    finish, length = gen.finish_reason, gen.length
    # A byte-level tokenizer can end a segment inside a UTF-8 character; finish the
    # character so every segment's text is whole (the next writer may use another tokenizer).
    extra = 0
    while (
        text.endswith("\ufffd")
        and finish == "length"
        and extra < MAX_CHAR_COMPLETION_TOKENS
        and len(ids) < limit
    ):
        more = await ms.generate(
            state,
            ctx.sampling(name, 1, seed_parts=(state.turn, 1 + extra), sample_seed=sample_seed),
        )
        ids += more.token_ids
        logprobs += more.logprobs
        top += more.top_logprobs
        finish, length = more.finish_reason, more.length
        text = ms.tokenizer.decode(ids, skip_special_tokens=True)
        extra += 1
    if finish == "eos" and not end_on_eos:
        # The end token leaves the sequence, and the writer's session: cut it off there,
        # so the writer's next turn goes on from its cache.
        ids, logprobs, top = ids[:-1], logprobs[:-1], top[: len(ids) - 1]
        await ms.truncate(length - 1)
        if not ids:
            return Outcome(finish="eos"), gen
    if not ids:
        return Outcome(), gen
    ms.synced = len(state.segments) + 1  # its own segment is already in its session
    gates = gen.gates[: len(ids) + (finish == "gate")]
    seg = Segment(
        name, tuple(ids), text, tuple(logprobs), state.turn, kind, finish, gates, gen.gate,
        tuple(top),
    )  # fmt: skip
    return Outcome(segments=(seg,), end_on_eos=end_on_eos), gen


class WriteExecutor:
    """Runs `WriteSegment`; with `speculate`, the writer drafts the next segment as soon as
    this one is written (`speculate.Draft`), for the next turn to take or cut off."""

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx
        self.draft: Draft | None = None

    async def run(self, decision: WriteSegment, state: SequenceState) -> Outcome:
        draft, self.draft = self.draft, None
        if draft is not None and draft.matches(decision, state):
            outcome = await draft.take()
        elif draft is not None and draft.decision.model != decision.model:
            discarding = asyncio.ensure_future(draft.discard())  # beside the new writer
            try:
                outcome = await self._write(state, decision)
            finally:
                await discarding
        else:
            if draft is not None:
                await draft.discard()
            outcome = await self._write(state, decision)
        if decision.speculate:
            self._speculate(decision, apply(state, outcome, self.ctx.trim))
        return outcome

    def _speculate(self, decision: WriteSegment, after: SequenceState) -> None:
        """Start the draft of the next segment from the state this outcome commits (the turn
        loop applies it too; only a speculating decision pays for the second `apply`)."""
        if not after.done and after.tokens_left > 0:
            session = self.ctx.sessions[decision.model]
            self.draft = Draft.start(self._draft, next_turn(after), decision, session)

    async def settle(self, state: SequenceState) -> Outcome:
        """Another kind of decision, or the end: a draft left is cut off, nothing committed."""
        draft, self.draft = self.draft, None
        if draft is not None:
            await draft.discard()
        return Outcome()

    async def _write(self, state: SequenceState, decision: WriteSegment) -> Outcome:
        outcome, _ = await self._draft(state, decision)
        return outcome

    def _draft(
        self, state: SequenceState, decision: WriteSegment
    ) -> Awaitable[tuple[Outcome, Generation | None]]:
        return draft_segment(self.ctx, state, decision.model, decision.max_tokens, "write",
                             end_on_eos=decision.end_on_eos,
                             sample_seed=decision.sample_seed)  # fmt: skip


class FinishExecutor(Stateless):
    """Runs `Finish`: the response ends here."""

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx

    async def run(self, decision: Finish, state: SequenceState) -> Outcome:
        return Outcome(finish="policy")
