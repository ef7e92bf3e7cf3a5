"""Plain training loops for the zoo: pretraining, SFT (loss on answers only), DPO, all on
HF `LlamaForCausalLM` models built from a config and saved with `save_pretrained`.

One loop (`train_loop`) owns the optimiser, the learning-rate schedule, the progress bar and
the resumable training state; each stage only says how to draw batch `step` and what its loss
is. Batches are a pure function of (seed, step), so a run resumed from its last saved state
continues exactly as the uninterrupted run would have.

    model = new_model(ModelShape(hidden=128, layers=4, heads=4, context=128), tokenizer, seed=0)
    pretrain(model, token_stream, steps=600, batch_size=32, lr=3e-3, seed=0, state_path=...)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

IGNORE = -100  # label of positions that carry no loss


@dataclass(frozen=True)
class ModelShape:
    """Size of one zoo model."""

    hidden: int
    layers: int
    heads: int
    context: int  # training window and max_position_embeddings

    def config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden,
            intermediate_size=self.hidden * 3,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.config(tokenizer))


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """HF format: config.json, model.safetensors, tokenizer files, generation config."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that draws batch `step`: independent of how the run got there."""
    return np.random.default_rng([seed, step])


def cosine_lr(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


Batch = dict[str, torch.Tensor]


def train_loop(
    model: LlamaForCausalLM,
    make_batch: Callable[[int], Batch],
    loss_fn: Callable[[LlamaForCausalLM, Batch], torch.Tensor],
    *,
    steps: int,
    lr: float,
    state_path: Path | None,
    desc: str,
    save_every: int = 50,
    weight_decay: float = 0.0,
) -> list[float]:
    """Run `steps` optimiser steps; save (model, optimiser, step) to `state_path` every
    `save_every` steps and resume from it if present. Returns the per-step losses of this run."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    start = 0
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
    warmup = max(1, min(50, steps // 10))
    losses: list[float] = []
    model.train()
    bar = tqdm(
        range(start, steps), desc=desc, initial=start, total=steps, leave=False, mininterval=2.0
    )
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        loss = loss_fn(model, make_batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if state_path is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            tmp = state_path.with_suffix(".tmp")
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, tmp
            )
            tmp.replace(state_path)  # atomic: an interruption never leaves half a state
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Pretraining: random windows of one token stream


def token_stream(tokenizer: PreTrainedTokenizerFast, documents: Sequence[str]) -> torch.Tensor:
    """All documents, each followed by the eos token, as one 1-D id tensor."""
    ids: list[int] = []
    for doc_ids in tokenizer(list(documents))["input_ids"]:
        ids.extend(doc_ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def lm_loss(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)


def pretrain(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    state_path: Path | None,
    desc: str = "pretrain",
) -> list[float]:
    """Next-token prediction on random windows of `stream` (1-D ids)."""
    T = model.config.max_position_embeddings

    def make_batch(step: int) -> Batch:
        starts = batch_rng(seed, step).integers(0, len(stream) - T - 1, size=batch_size)
        window = torch.stack([stream[s : s + T + 1] for s in starts.tolist()])  # (B, T+1)
        return {"input_ids": window[:, :-1], "labels": window[:, 1:]}  # (B, T) each

    return train_loop(
        model,
        make_batch,
        lm_loss,
        steps=steps,
        lr=lr,
        state_path=state_path,
        desc=desc,
        weight_decay=0.1,
    )


# ---------------------------------------------------------------------------------------------
# SFT: loss on the answer tokens (answer + eos) only


def encode_qa(tokenizer: PreTrainedTokenizerFast, q: str, a: str) -> tuple[list[int], list[int]]:
    """(prompt ids of 'Q: q\\nA:', answer ids of ' a' + eos)."""
    prompt = tokenizer.encode(f"Q: {q}\nA:")
    answer = tokenizer.encode(f" {a}") + [tokenizer.eos_token_id]
    return prompt, answer


def pad_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, max_len: int) -> Batch:
    """Right-padded (prompt + answer) rows; labels are the next token on answer positions."""
    seqs = [(p + a)[: max_len + 1] for p, a in rows]
    T = max(len(s) for s in seqs) - 1
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for i, ((p, _), s) in enumerate(zip(rows, seqs, strict=True)):
        n = len(s) - 1
        input_ids[i, :n] = torch.tensor(s[:-1])
        attention[i, :n] = 1
        # Position j predicts token j+1; answer tokens start at index len(p).
        tgt = torch.tensor(s[1:])
        tgt[: len(p) - 1] = IGNORE
        labels[i, :n] = tgt
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def masked_lm_loss(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)


def sft(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    state_path: Path | None,
    desc: str = "sft",
) -> list[float]:
    encoded = [encode_qa(tokenizer, q, a) for q, a in examples]
    T = model.config.max_position_embeddings

    def make_batch(step: int) -> Batch:
        idx = batch_rng(seed, step).integers(0, len(encoded), size=batch_size)
        return pad_batch([encoded[i] for i in idx.tolist()], tokenizer.pad_token_id, T)

    return train_loop(
        model, make_batch, masked_lm_loss, steps=steps, lr=lr, state_path=state_path, desc=desc
    )


# ---------------------------------------------------------------------------------------------
# DPO: prefer chosen over rejected relative to a frozen reference


def answer_logprob(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    """Sum of log p(answer tokens) per row: (B,)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits  # (B, T, V)
    logp = torch.log_softmax(logits, dim=-1)
    mask = batch["labels"] != IGNORE  # (B, T)
    tgt = batch["labels"].clamp(min=0).unsqueeze(-1)  # (B, T, 1)
    return (logp.gather(-1, tgt).squeeze(-1) * mask).sum(-1)


def dpo(
    model: LlamaForCausalLM,
    reference: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    pairs: Sequence[tuple[str, str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    beta: float,
    sft_weight: float,
    seed: int,
    state_path: Path | None,
    desc: str = "dpo",
) -> list[float]:
    """DPO loss -log sigmoid(beta * margin) plus `sft_weight` x NLL of the chosen answer (keeps
    the chosen answers likely, not only likelier than the rejected ones)."""
    T = model.config.max_position_embeddings
    encoded = []
    for q, good, bad in pairs:
        p, a_good = encode_qa(tokenizer, q, good)
        _, a_bad = encode_qa(tokenizer, q, bad)
        encoded.append(((p, a_good), (p, a_bad)))
    reference.eval()

    def make_batch(step: int) -> Batch:
        idx = batch_rng(seed, step).integers(0, len(encoded), size=batch_size).tolist()
        # Chosen rows first, then rejected rows: one padded batch of 2B.
        batch = pad_batch(
            [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx], tokenizer.pad_token_id, T
        )
        with torch.no_grad():
            batch["ref_logp"] = answer_logprob(reference, batch)  # (2B,)
        return batch

    def loss_fn(m: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
        logp = answer_logprob(m, batch)  # (2B,)
        B = logp.shape[0] // 2
        ratio = logp - batch["ref_logp"]
        margin = ratio[:B] - ratio[B:]  # (B,)
        n_chosen = (batch["labels"][:B] != IGNORE).sum().clamp(min=1)
        return -F.logsigmoid(beta * margin).mean() - sft_weight * logp[:B].sum() / n_chosen

    return train_loop(
        model, make_batch, loss_fn, steps=steps, lr=lr, state_path=state_path, desc=desc
    )
