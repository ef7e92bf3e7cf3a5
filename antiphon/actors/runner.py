"""The model runner: pack the planned rows' caches, run one forward pass, unpack.

A decode pass feeds one token per row. While the set of decoding sessions does not change the
stacked cache is kept from step to step (the model appends to it), so a steady batch pays no
repacking; the sessions' own `kv` is empty meanwhile, and `drop_decode_batch` gives it back.
A prefill pass right-pads each row's new tokens to the longest, left-pads the caches, and
returns logits only at the positions someone needs. Either pass also returns the LM head's
input at those positions when the checkpoint carries a deferral gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from antiphon.actors import kv as kvcache
from antiphon.actors.calls import Call
from antiphon.actors.sessions import Session
from antiphon.checkpoint import cache_argument

Logits = torch.Tensor  # (positions, V) for one row of a prefill pass, (B, V) for a decode pass


@dataclass
class Row:
    """One session's part of a forward pass."""

    session: Session
    call: Call
    tokens: list[int]  # fed this step
    keep: int  # of those, how many stay in the session's cache
    logit_positions: list[int]  # indices into tokens whose next-token logits are needed


@dataclass
class _DecodeBatch:
    """Stacked caches of the sessions decoding together, kept while the set is unchanged."""

    sessions: list[Session]
    cache: Any  # DynamicCache (B, H, L, D) per layer
    pads: list[int]  # left pad positions per row
    mask: torch.Tensor | None  # (B, L) 1 = real position; None when nothing is padded


class ModelRunner:
    """Runs the model on planned rows; the only code that calls the model."""

    def __init__(self, model: PreTrainedModel, max_context: int, capture_head_input: bool) -> None:
        self.model = model
        self.cache_argument = cache_argument(model)  # the forward's name for the KV cache
        self.device = next(model.parameters()).device
        self.max_context = max_context
        self.forward_passes = 0  # model calls since start (a batched call counts once)
        self.forward_tokens = 0  # positions fed since start, pads not counted
        self._batch: _DecodeBatch | None = None
        self._head_input: torch.Tensor | None = None
        if capture_head_input:
            model.get_output_embeddings().register_forward_pre_hook(self._remember_head_input)

    def _remember_head_input(self, module: torch.nn.Module, args: tuple) -> None:
        self._head_input = args[0]

    # -- the decode batch -------------------------------------------------------------------

    def batch_slot(self, session: Session) -> int | None:
        """The session's row in the kept decode batch, or None."""
        if self._batch is None:
            return None
        return next((i for i, s in enumerate(self._batch.sessions) if s is session), None)

    def drop_decode_batch(self, keep_caches: bool = True) -> None:
        """Give every session of the decode batch its own cache back and forget the batch."""
        batch, self._batch = self._batch, None
        if batch is None or not keep_caches:
            return
        layers = kvcache.layers_of(batch.cache)
        for i, session in enumerate(batch.sessions):
            start = batch.pads[i]
            session.kv = kvcache.unpack_row(layers, i, start, start + session.n_cached)

    def unfeed_last(self, session: Session) -> None:
        """The token just fed goes back to pending (a gate stopped before writing after it)."""
        session.n_cached -= 1
        if self.batch_slot(session) is None:
            session.kv = kvcache.crop(session.kv, session.n_cached)

    # -- passes -----------------------------------------------------------------------------

    def decode(self, rows: list[Row]) -> tuple[Logits, torch.Tensor | None]:
        """One token per row; (logits (B, V), head input (B, H) or None)."""
        batch = self._batch
        if batch is None or [r.session for r in rows] != batch.sessions:
            self.drop_decode_batch()
            lengths = [r.session.n_cached for r in rows]
            cache, pads = kvcache.pack([r.session.kv for r in rows], lengths)
            mask = None
            if any(pads):
                mask = torch.ones(len(rows), max(lengths), dtype=torch.long)
                for i, p in enumerate(pads):
                    mask[i, :p] = 0
                mask = mask.to(self.device)
            batch = self._batch = _DecodeBatch([r.session for r in rows], cache, pads, mask)
            for session in batch.sessions:
                session.kv = []  # the batch holds it now
        if batch.mask is not None:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        logits, hidden = self._forward(
            rows, batch.cache, [r.session.n_cached for r in rows], batch.mask, 1
        )
        for r in rows:
            r.session.n_cached += 1
        return logits[:, -1], None if hidden is None else hidden[:, -1]

    def prefill(self, rows: list[Row]) -> list[tuple[Logits | None, torch.Tensor | None]]:
        """Each row's tokens; per row, (logits at its logit positions, head input there)."""
        if any(self.batch_slot(r.session) is not None for r in rows):
            self.drop_decode_batch()
        past = [r.session.n_cached for r in rows]
        cache, pads = kvcache.pack([r.session.kv for r in rows], past)
        width = max(len(r.tokens) for r in rows)
        longest_past = max(past)
        mask = None
        if any(pads) or any(len(r.tokens) != width for r in rows):
            mask = torch.zeros(len(rows), longest_past + width, dtype=torch.long)
            for i, r in enumerate(rows):
                mask[i, pads[i] : longest_past + len(r.tokens)] = 1
            mask = mask.to(self.device)
        want = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            want[i, r.logit_positions] = True
        n_wanted = int(want.sum())
        logits, hidden = self._forward(
            rows, cache, past, mask, want.to(self.device) if n_wanted else 1
        )
        layers = kvcache.layers_of(cache)
        out: list[tuple[Logits | None, torch.Tensor | None]] = []
        offset = 0  # rows' wanted positions come flattened, row after row
        for i, r in enumerate(rows):
            r.session.kv = kvcache.unpack_row(layers, i, pads[i], longest_past + r.keep)
            r.session.n_cached += r.keep
            k = len(r.logit_positions)
            row_logits = logits[offset : offset + k] if k else None
            row_hidden = hidden[offset : offset + k] if (k and hidden is not None) else None
            out.append((row_logits, row_hidden))
            offset += k
        return out

    def _forward(
        self,
        rows: list[Row],
        cache: Any,
        past_lengths: list[int],
        mask: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One model call over right-padded rows; logits and the LM head's input at the kept
        positions."""
        width = max(len(r.tokens) for r in rows)
        input_ids = [r.tokens + [0] * (width - len(r.tokens)) for r in rows]  # (B, width)
        last_position = self.max_context - 1
        positions = [
            [min(n + j, last_position) for j in range(width)] for n in past_lengths
        ]  # pads get harmless positions past their row's end
        self._head_input = None
        out = self.model(
            input_ids=torch.tensor(input_ids, device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=self.device),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_argument: cache},
        )
        self.forward_passes += 1
        self.forward_tokens += sum(len(r.tokens) for r in rows)
        for r in rows:
            r.call.computed += len(r.tokens)
        hidden, self._head_input = self._head_input, None
        return out.logits, hidden
