"""Output processing: what a forward pass's logits mean for each call.

- `next_tokens`: for the generate calls of a pass, the gate (stop before a token whose gate
  reaches the threshold), the calls' logits processors (bias, penalties, a grammar:
  `antiphon.actors.logits`), the token choice (`antiphon.actors.sampling`, the one sampler)
  and the stop checks (stop token, end of sequence, stop string, budget, context). It records
  the token in the call and says whether the call is done; the engine updates the session.
- `token_logprobs`, `teacher_forced` and `candidate_logprobs`: what a score call returns.
- `generation`: the result of a finished generate call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from antiphon.actors.calls import Generate
from antiphon.actors.logits import apply_processors
from antiphon.actors.sampling import choose_tokens, find_stop_string, top_alternatives
from antiphon.messages import FinishReason, Generation, TeacherForced


@dataclass(frozen=True, slots=True)
class TokenStep:
    """What one generate call did with one position's logits."""

    token: int | None  # the token written; None when the gate stopped the call before it
    finish: FinishReason | None  # why the call is done, or None if it goes on
    text_cut: int | None = None  # where a matched stop string starts in the call's text


class OutputProcessor:
    """Turns logits into tokens and results for one checkpoint."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
        max_context: int,
    ) -> None:
        self.decode = decode  # token ids -> text, special tokens skipped
        self.eos_ids = eos_ids
        self.max_context = max_context

    def next_tokens(
        self,
        ops: Sequence[Generate],
        lengths: Sequence[int],
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
    ) -> list[TokenStep]:
        """One step of every generate call: logits (B, V) of its next position, its session's
        length before the step, and the LM head's input (B, H) where a gate reads it (each
        call's own gate: a gate published mid-batch applies to the calls started after it)."""
        gates = None
        if hidden is not None and ops[0].gate is not None:
            gates = _gate_values(ops, hidden)
        shaped = apply_processors(logits, [op.processors for op in ops])
        tokens, logprobs, matrix = choose_tokens(
            logits, [op.params for op in ops], [op.generator for op in ops], shaped
        )
        steps = []
        for i, op in enumerate(ops):
            if gates is not None:
                op.gates.append(gates[i])
                threshold = op.params.gate_threshold_at(len(op.token_ids))
                # 1 never fires: a sigmoid is below 1, though float32 rounds it up to 1
                if threshold is not None and threshold < 1.0 and gates[i] >= threshold:
                    steps.append(TokenStep(None, "gate"))
                    continue
            op.token_ids.append(tokens[i])
            op.logprobs.append(logprobs[i])
            for processor in op.processors:
                processor.accept(tokens[i])
            if op.params.logprobs_top_k:
                op.top_logprobs.append(top_alternatives(matrix[i], op.params.logprobs_top_k))
            steps.append(self._stop(op, tokens[i], lengths[i] + 1))
        return steps

    def _stop(self, op: Generate, token: int, length: int) -> TokenStep:
        params = op.params
        if token in params.stop_token_ids:
            return TokenStep(token, "stop")
        if token in self.eos_ids and not params.ignore_eos:
            return TokenStep(token, "eos")
        if params.stop_strings:
            cut = find_stop_string(self.decode(op.token_ids), params.stop_strings)
            if cut is not None:
                return TokenStep(token, "stop", cut)
        if len(op.token_ids) >= params.max_new_tokens or length >= self.max_context:
            return TokenStep(token, "length")
        return TokenStep(token, None)

    def generation(
        self,
        op: Generate,
        step: TokenStep,
        session_id: str,
        length: int,
        computed: int,
    ) -> Generation:
        """The result of a generate call that `step` finished."""
        text = self.decode(op.token_ids)
        if step.text_cut is not None:
            text = text[: step.text_cut]
        return Generation(
            session_id=session_id,
            token_ids=tuple(op.token_ids),
            text=text,
            logprobs=tuple(op.logprobs),
            top_logprobs=tuple(op.top_logprobs),
            gates=tuple(op.gates),
            gate=op.gate.fingerprint if op.gate is not None else "",
            finish_reason=step.finish,
            length=length,
            new_tokens_computed=computed,
        )


def _gate_values(ops: Sequence[Generate], hidden: torch.Tensor) -> list[float]:
    """Each call's gate on its row of hidden (B, H): one matrix product per distinct gate
    (one, but for the steps after a publication)."""
    values = [0.0] * len(ops)
    for gate in {id(op.gate): op.gate for op in ops}.values():
        rows = [i for i, op in enumerate(ops) if op.gate is gate]
        for i, v in zip(rows, gate(hidden[rows]).tolist(), strict=True):
            values[i] = v
    return values


def token_logprobs(logits: torch.Tensor, token_ids: list[int]) -> list[float]:
    """log p of each token at its position: logits (N, V) of the N positions before them."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(token_ids, device=logprobs.device)
    return logprobs.gather(1, targets[:, None])[:, 0].tolist()


def teacher_forced(logits: torch.Tensor, token_ids: list[int], top_k: int = 0) -> TeacherForced:
    """log p of each token at its position, the argmax there, and the top_k most likely
    tokens there: logits (N, V)."""
    top = ()
    if top_k:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = tuple(top_alternatives(row, top_k) for row in logprobs)
    return TeacherForced(
        tuple(token_logprobs(logits, token_ids)), tuple(logits.argmax(-1).tolist()), top
    )


def candidate_logprobs(logits: torch.Tensor, candidate_ids: list[int]) -> list[float]:
    """log p of each candidate as the next token: logits (1, V) or (N, V) (the last row)."""
    logprobs = torch.log_softmax(logits[-1].float(), dim=-1)  # (V,)
    return logprobs[candidate_ids].tolist()
