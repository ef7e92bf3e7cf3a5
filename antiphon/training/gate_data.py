"""Co-LLM gate training data, computed once: for every gold token of every gold answer, the
base model's head input (what the gate reads), its log p and argmax, and the frozen
assistant's log p and argmax by teacher forcing (the engine's `teacher_force`). Stored as
one safetensors file with a JSON provenance beside it (which checkpoints, which weights,
which items), so a gate says what it was trained on.

    texts = gold_texts(items, tokenizer)                  # (key, TaskItem) pairs -> ids
    data = await build_gate_data(base_model, assistant_engine, texts, provenance)
    data.save(out_dir); data = GateData.load(out_dir)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from antiphon.errors import InvalidRequest
from antiphon.messages import TeacherForced
from antiphon.zoo.tasks import TaskItem

DATA_FILE, PROVENANCE_FILE = "gate_data.safetensors", "gate_data.json"
TENSORS = ("hidden", "gold", "base_logprobs", "base_argmax", "asst_logprobs", "asst_argmax",
           "example", "position")  # fmt: skip


@dataclass(frozen=True)
class GoldText:
    """One gold answer in the models' shared tokenizer: the prompt and the answer after it."""

    key: str  # e.g. "qa-knowledge/3"
    prompt_ids: tuple[int, ...]  # special tokens included, as a session opens it
    gold_ids: tuple[int, ...]  # " " + reference, then the end token


def gold_texts(items: Sequence[tuple[str, TaskItem]], tokenizer: Any) -> list[GoldText]:
    """Gold answers as the tuned models write them after "A:": a space, the reference, the
    end token."""
    eos = tokenizer.eos_token_id
    out = []
    for key, item in items:
        prompt = tokenizer(item.prompt)["input_ids"]
        answer = tokenizer(" " + item.reference, add_special_tokens=False)["input_ids"]
        out.append(GoldText(key, tuple(prompt), tuple(answer) + (eos,)))
    return out


def head_inputs(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor):
    """Logits (B, L, V) and the LM head's input (B, L, H) of a right-padded batch: the hidden
    state the engine's gate reads (grads flow when the caller trains)."""
    captured: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: captured.append(args[0])
    )
    try:
        logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        hook.remove()
    return logits, captured[0]


def batch_of(texts: Sequence[GoldText], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) of prompt + answer, and the attention mask (B, L)."""
    rows = [list(t.prompt_ids + t.gold_ids) for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def answer_positions(texts: Sequence[GoldText]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of the logits that predict each gold token, all texts flattened (T,)."""
    rows, cols = [], []
    for i, t in enumerate(texts):
        start = len(t.prompt_ids) - 1
        rows += [i] * len(t.gold_ids)
        cols += range(start, start + len(t.gold_ids))
    return torch.tensor(rows), torch.tensor(cols)


@torch.no_grad()
def base_forced(
    model: PreTrainedModel, texts: Sequence[GoldText], pad_id: int, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """hidden (T, H), base_logprobs (T,), base_argmax (T,) over every gold token."""
    parts: dict[str, list[torch.Tensor]] = {"hidden": [], "base_logprobs": [], "base_argmax": []}
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        ids, mask = batch_of(chunk, pad_id)
        logits, hidden = head_inputs(model, ids, mask)
        rows, cols = answer_positions(chunk)
        gold = torch.tensor([g for t in chunk for g in t.gold_ids])
        logprobs = torch.log_softmax(logits[rows, cols].float(), dim=-1)  # (T, V)
        parts["hidden"].append(hidden[rows, cols].float())
        parts["base_logprobs"].append(logprobs.gather(1, gold[:, None])[:, 0])
        parts["base_argmax"].append(logprobs.argmax(-1))
    return {k: torch.cat(v) for k, v in parts.items()}


async def assistant_forced(
    assistant: Any, texts: Sequence[GoldText], concurrency: int = 1
) -> list[TeacherForced]:
    """The assistant's log p and argmax at every gold token: a session on each prompt, one
    `teacher_force` call over its answer (any engine or deployment client that has it).
    One at a time by default: an engine batches concurrent prefills, and a batch's shape
    moves the last bits of its logits, which a gate trained on them (and the base trained
    with it) carries into everything after; alone, each text's numbers are the same in
    every run."""
    limit = asyncio.Semaphore(concurrency)

    async def one(text: GoldText) -> TeacherForced:
        async with limit:
            session = await assistant.open(list(text.prompt_ids))
            try:
                return await assistant.teacher_force(session.session_id, list(text.gold_ids))
            finally:
                await assistant.close(session.session_id)

    return list(await asyncio.gather(*(one(t) for t in texts)))


@dataclass
class GateData:
    """Per gold token (T rows): the gate's input and both models' view of the token."""

    hidden: torch.Tensor  # (T, H) float32, the base's head input
    gold: torch.Tensor  # (T,) the gold token
    base_logprobs: torch.Tensor  # (T,) log p_base(gold)
    base_argmax: torch.Tensor  # (T,)
    asst_logprobs: torch.Tensor  # (T,) log p_asst(gold), the assistant frozen
    asst_argmax: torch.Tensor  # (T,)
    example: torch.Tensor  # (T,) index into keys
    position: torch.Tensor  # (T,) token index within its answer
    keys: list[str] = field(default_factory=list)  # one per gold text
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.gold.numel())

    def where(self, keep_examples: Sequence[int]) -> GateData:
        """The tokens of the given examples (indices into keys), keys kept whole."""
        mask = torch.isin(self.example, torch.tensor(list(keep_examples), dtype=torch.long))
        return GateData(
            **{name: getattr(self, name)[mask] for name in TENSORS},
            keys=self.keys, provenance=self.provenance,
        )  # fmt: skip

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: getattr(self, n).contiguous() for n in TENSORS}, str(out / DATA_FILE))
        meta = {"keys": self.keys, "provenance": self.provenance}
        (out / PROVENANCE_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> GateData:
        d = Path(directory)
        if not (d / DATA_FILE).is_file():
            raise InvalidRequest(f"no gate training data in {d} (expected {DATA_FILE})")
        tensors = load_file(str(d / DATA_FILE))
        meta = json.loads((d / PROVENANCE_FILE).read_text())
        return cls(**{n: tensors[n] for n in TENSORS}, keys=meta["keys"],
                   provenance=meta["provenance"])  # fmt: skip


async def build_gate_data(
    base: PreTrainedModel,
    pad_id: int,
    assistant: Any,
    texts: Sequence[GoldText],
    provenance: dict[str, Any],
) -> GateData:
    """Both models over every gold text: the base in this process, the assistant through
    its engine."""
    forced = await assistant_forced(assistant, texts)
    own = base_forced(base, texts, pad_id)
    gold = torch.tensor([g for t in texts for g in t.gold_ids])
    example = torch.tensor([i for i, t in enumerate(texts) for _ in t.gold_ids])
    position = torch.tensor([j for t in texts for j in range(len(t.gold_ids))])
    return GateData(
        hidden=own["hidden"], gold=gold,
        base_logprobs=own["base_logprobs"], base_argmax=own["base_argmax"],
        asst_logprobs=torch.tensor([lp for f in forced for lp in f.logprobs]),
        asst_argmax=torch.tensor([a for f in forced for a in f.argmax]),
        example=example, position=position, keys=[t.key for t in texts],
        provenance={**provenance, "texts": len(texts), "tokens": int(gold.numel())},
    )  # fmt: skip
