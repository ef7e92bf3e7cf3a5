"""`WriteUntilDeferral` (Co-LLM): the base model drafts until its gate fires (decided next to
the model, inside one generate call, so a draft costs one round trip however long it runs);
then, at the gated position:

- strategy "defer": the assistant writes `assistant_tokens` tokens. When the two models'
  tokenizers differ it goes on to the end of the word (a text boundary), so the base
  re-tokenizes whole words and never continues half a word in a foreign tokenization;
- strategy "compose": one token, the argmax (or a seeded sample, at the request's
  temperature) of (1-g) p_base + g p_assistant, g the gate there. It is attributed to the
  model whose share of its mixed probability is larger. Needs a shared vocabulary.

The assistant writes after the state the base's draft leads to (`apply`), so it does not
write when that draft already ended the response.
"""

from __future__ import annotations

import asyncio
import math

from antiphon.actors.sampling import choose_tokens, new_generator, top_alternatives
from antiphon.coordinator.commit import Outcome, apply
from antiphon.coordinator.executors.base import ExecutionContext, Stateless
from antiphon.coordinator.executors.write import draft_segment, write_segment
from antiphon.coordinator.sessions import ModelSession
from antiphon.errors import InvalidRequest, SessionLost
from antiphon.policies.base import WriteUntilDeferral
from antiphon.policies.defer import warmup_thresholds
from antiphon.policies.fusion import fuse
from antiphon.sequence import Segment, SequenceState

BOUNDARY_MAX_TOKENS = 16  # most tokens an assistant of another tokenizer adds to end a word


def at_text_boundary(text: str) -> bool:
    """A word is complete: the text ends in whitespace or punctuation."""
    return not text or not text[-1].isalnum()


class DeferExecutor(Stateless):
    """Runs `WriteUntilDeferral`."""

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx

    async def run(self, decision: WriteUntilDeferral, state: SequenceState) -> Outcome:
        d = decision
        warmup = warmup_thresholds(
            state.tokens_written, d.max_tokens, d.warmup_schedule, d.warmup_steps,
            d.warmup_start, d.gate_threshold,
        )  # fmt: skip
        drafted, gen = await draft_segment(
            self.ctx, state, d.base, d.max_tokens, "write", gate=d.gate_threshold,
            gate_warmup=warmup,
        )  # fmt: skip
        after = apply(state, drafted, self.ctx.trim)
        if after.done or gen is None or gen.finish_reason != "gate":
            return drafted
        if d.strategy == "compose":
            composed = await self._compose(d, after, gen.gates[-1], gen.gate)
            if composed is not None:
                return drafted.then(Outcome(segments=(composed,)))
        return drafted.then(await self._assist(d, after))

    async def _assist(self, d: WriteUntilDeferral, state: SequenceState) -> Outcome:
        """The assistant's tokens; to the end of the word when the base reads other tokens."""
        helped = await write_segment(self.ctx, state, d.assistant, d.assistant_tokens, "deferred")
        sessions = self.ctx.sessions
        if not helped.segments or sessions.fingerprint(d.assistant) == sessions.fingerprint(d.base):
            return helped
        parts = list(helped.segments)
        now = apply(state, helped, self.ctx.trim)
        while len(parts) <= BOUNDARY_MAX_TOKENS and not (now.done or at_text_boundary(now.text)):
            more = await write_segment(self.ctx, now, d.assistant, 1, "deferred")
            if not more.segments:
                return Outcome(segments=(_joined(parts),), finish=more.finish)
            parts += more.segments
            now = apply(now, more, self.ctx.trim)
        sessions[d.assistant].synced = len(state.segments) + 1  # the joined segment
        return Outcome(segments=(_joined(parts),))

    async def _compose(
        self, d: WriteUntilDeferral, state: SequenceState, g: float, gate: str
    ) -> Segment | None:
        """The token of the mixture at the gated position, or None where one token cannot
        stand alone as text (a split character: the assistant writes it out instead)."""
        sessions = self.ctx.sessions
        if sessions.fingerprint(d.assistant) != sessions.fingerprint(d.base):
            raise InvalidRequest(
                f"strategy 'compose' mixes next-token distributions: {d.base!r} and "
                f"{d.assistant!r} have different tokenizers (use strategy 'defer')"
            )
        base, helper = sessions[d.base], sessions[d.assistant]
        try:
            lp_base, lp_asst = await _distributions(base, helper, state)
        except SessionLost:  # a replica restarted: both sessions again from the state
            base.session_id = helper.session_id = None
            lp_base, lp_asst = await _distributions(base, helper, state)
        g = min(max(g, 1e-6), 1 - 1e-6)
        mixed = fuse([lp_base, lp_asst], [1 - g, g])  # (V,) log of the mixture
        params = self.ctx.sampling(d.base, 1, seed_parts=(state.turn, 2))
        if params.reads_response or params.logit_bias:
            raise InvalidRequest(
                "strategy 'compose' samples from a mixture of two models, not from one "
                "model's logits: it takes no penalties, logit_bias or response_format "
                "(use strategy 'defer')"
            )
        (token,), _, _ = choose_tokens(mixed[None], [params], [new_generator(params.seed)])
        from_asst = lp_asst[token] + math.log(g) >= lp_base[token] + math.log(1 - g)
        writer = d.assistant if from_asst else d.base
        text = sessions[writer].tokenizer.decode([token], skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return None
        finish = "eos" if token in base.info.eos_token_ids else "length"
        kind = "deferred" if writer == d.assistant else "write"
        logprob = float(mixed[token])
        k = params.logprobs_top_k
        top = (top_alternatives(mixed, k),) if k else ()
        return Segment(
            writer, (token,), text, (logprob,), state.turn, kind, finish, (g,), gate, top
        )


async def _distributions(base: ModelSession, helper: ModelSession, state: SequenceState):
    """Both models' next-token log-probabilities over the whole vocabulary after the state."""
    await asyncio.gather(base.sync(state), helper.sync(state))
    vocab = list(range(base.info.vocab_size))
    return await asyncio.gather(
        base.model.next_token_logprobs(base.session_id, vocab),
        helper.model.next_token_logprobs(helper.session_id, vocab),
    )


def _joined(parts: list[Segment]) -> Segment:
    """One segment of consecutive segments of one writer."""
    first, last = parts[0], parts[-1]
    return Segment(
        first.model, sum((p.token_ids for p in parts), ()), "".join(p.text for p in parts),
        sum((p.logprobs for p in parts), ()), first.turn, first.kind, last.model_finish,
        gate=first.gate, top_logprobs=sum((p.top_logprobs for p in parts), ()),
    )  # fmt: skip
