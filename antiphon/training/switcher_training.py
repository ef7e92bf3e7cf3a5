"""Supervised training of the switcher on rollout labels: (tagged switcher prompt -> index of
the best candidate). Full fine-tune (the zoo's small switcher) or LoRA through `peft` (a large
one). The result is an HF checkpoint the `switch` policy loads; with LoRA the adapter is merged
into it, and saved alone too (`adapter/`: a PEFT adapter directory, which loads as any other
checkpoint, merged into its base).

    examples = RolloutStore("runs/rollouts").examples()
    report = train_switcher(examples, init="zoo:sft", out_dir="runs/switcher",
                            cfg=SwitcherTrainConfig(epochs=3, max_context=1024))
    print(report.val_accuracy)

Loss: -log of the total probability (full-vocabulary softmax at the last position) of the
index tokens of the best candidates (several when utilities tie). Accuracy: the most likely
index token among the candidates' is one of the best. Examples whose candidates all tie are
left out. The validation split is by query, so no query has prefixes on both sides. Batches
hold examples of similar length (transformers' length-grouped order, the batches then
shuffled): padding every prompt of a random batch to its longest nearly doubled the tokens a
step reads.
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, get_scheduler
from transformers.trainer_pt_utils import get_length_grouped_indices

from antiphon.checkpoint import load_tokenizer, resolve_checkpoint_path
from antiphon.policies.switcher import index_token_ids, switcher_prompt_ids
from antiphon.training.rollouts import RolloutExample

REPORT_FILE = "switcher_training.json"
ADAPTER_DIR = "adapter"  # with LoRA: the PEFT adapter alone, beside the merged checkpoint


# transformers' schedules that step without a metric or extra arguments
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass(frozen=True)
class SwitcherTrainConfig:
    epochs: int = 3
    batch_size: int = 16
    lr: float = 3e-4  # the paper's LoRA used 1e-5 on an 8B model; tiny models want more
    weight_decay: float = 0.0
    lora_r: int = 0  # 0: full fine-tune; else LoRA rank (the paper: 64)
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_context: int | None = None  # raise the init checkpoint's context (RoPE models)
    val_fraction: float = 0.2  # share of queries held out for validation
    seed: int = 0
    max_steps: int | None = None  # stop early after this many optimiser steps
    lr_schedule: str = "constant"  # one of LR_SCHEDULES, over every step
    warmup_ratio: float = 0.0  # share of the steps the lr ramps up over first

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: not one of {LR_SCHEDULES}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio {self.warmup_ratio}: must be in [0, 1)")


@dataclass
class TrainReport:
    train_examples: int
    val_examples: int
    skipped_ties: int  # examples with no preference, left out
    steps: int
    losses: list[float] = field(default_factory=list)  # per step
    val_accuracy_before: float | None = None  # the untrained switcher
    val_accuracy: float | None = None
    val_majority: float | None = None  # always answering the most frequent training label
    val_accuracy_by_task: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Encoded:
    ids: list[int]
    best: list[int]
    n: int
    task: str


def split_by_query(
    examples: Sequence[RolloutExample], val_fraction: float, seed: int
) -> tuple[list[RolloutExample], list[RolloutExample]]:
    """(train, validation): a query's prefixes all land on the same side (by a seeded hash)."""
    train, val = [], []
    for ex in examples:
        h = zlib.crc32(f"{seed}:{ex.query_key}".encode()) / 2**32
        (val if h < val_fraction else train).append(ex)
    return train, val


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[RolloutExample], max_len: int
) -> list[_Encoded]:
    return [
        _Encoded(
            switcher_prompt_ids(tokenizer, ex.query, ex.prefix, len(ex.models), max_len),
            list(ex.best),
            len(ex.models),
            ex.task,
        )
        for ex in examples
    ]


def collate(batch: Sequence[_Encoded], pad_id: int, n: int) -> dict[str, torch.Tensor]:
    """Left-padded ids so every row's last position is the prompt's end."""
    T = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # (B, T)
    best = torch.zeros((len(batch), n), dtype=torch.bool)  # (B, n)
    for i, e in enumerate(batch):
        ids[i, T - len(e.ids) :] = torch.tensor(e.ids)
        mask[i, T - len(e.ids) :] = 1
        best[i, e.best] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "best": best}


def index_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], index_ids: Sequence[int]
) -> torch.Tensor:
    """(B, n) log p of each index token at the prompt's end (full-vocabulary softmax)."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=batch["position_ids"].to(device),
        logits_to_keep=1,
    )
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    return logp[:, list(index_ids)]


def switcher_loss(index_logp: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log sum_{i in best} p_i; index_logp (B, n), best (B, n) bool."""
    best = best.to(index_logp.device)
    masked = index_logp.masked_fill(~best, float("-inf"))
    return -torch.logsumexp(masked, dim=-1).mean()


def grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch's batches of indices, each of similar lengths (transformers' length-grouped
    order, seeded from `rng`), in shuffled order."""
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    order = get_length_grouped_indices(list(lengths), batch_size, generator=generator)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)  # not longest first: a step's length should not follow its place
    return batches


@torch.no_grad()
def hits(
    model: torch.nn.Module,
    encoded: Sequence[_Encoded],
    index_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
) -> list[float]:
    """Per row, 1.0 if the model's most likely index is among the row's best, else 0.0."""
    was_training = model.training
    model.eval()
    out = [0.0] * len(encoded)
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))  # less padding
    for start in range(0, len(encoded), batch_size):
        rows = by_length[start : start + batch_size]
        batch = collate([encoded[i] for i in rows], pad_id, len(index_ids))
        pred = index_logprobs(model, batch, index_ids).argmax(-1)  # (B,)
        for i, p in zip(rows, pred.tolist(), strict=True):
            out[i] = float(p in encoded[i].best)
    model.train(was_training)
    return out


def accuracy(
    model: torch.nn.Module,
    encoded: Sequence[_Encoded],
    index_ids: Sequence[int],
    pad_id: int,
    batch_size: int = 32,
) -> tuple[float, dict[str, float]]:
    """(share of rows whose most likely index is among the best, the same per task)."""
    by_task: dict[str, list[float]] = {}
    for e, hit in zip(encoded, hits(model, encoded, index_ids, pad_id, batch_size), strict=True):
        by_task.setdefault(e.task, []).append(hit)
    every = [h for hs in by_task.values() for h in hs]
    shares = {t: sum(h) / len(h) for t, h in sorted(by_task.items())}
    return (sum(every) / len(every) if every else float("nan")), shares


def example_hits(switcher: str, examples: Sequence[RolloutExample]) -> list[float]:
    """Per labelled example, 1.0 if the switcher at `switcher` (an HF dir or 'zoo:NAME')
    ranks one of its best models first: a dev score per item, for comparing versions."""
    model, tokenizer = load_init(switcher, None)
    n = len(examples[0].models)
    max_len = int(model.config.get_text_config().max_position_embeddings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return hits(model, encode(tokenizer, examples, max_len), index_token_ids(tokenizer, n), pad_id)


def load_init(
    init: str, max_context: int | None
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The initial switcher (an HF dir or 'zoo:NAME'), with its context raised if asked."""
    where = resolve_checkpoint_path(init)
    tokenizer = load_tokenizer(where)
    extra = {"max_position_embeddings": max_context} if max_context else {}
    model = AutoModelForCausalLM.from_pretrained(where, use_safetensors=True, **extra)
    return model, tokenizer


def train_switcher(
    examples: Sequence[RolloutExample],
    init: str,
    out_dir: str | Path,
    cfg: SwitcherTrainConfig = SwitcherTrainConfig(),
    progress: bool = True,
) -> TrainReport:
    """Fine-tune `init` on the labelled examples, save the switcher to out_dir (HF format)
    with a report (switcher_training.json), and return the report."""
    t0 = time.time()
    informative = [ex for ex in examples if ex.informative]
    if not informative:
        raise ValueError("no example prefers one candidate over another: nothing to learn")
    n = len(informative[0].models)
    if any(len(ex.models) != n for ex in informative):
        raise ValueError("all examples must come from ensembles of the same size")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_init(init, cfg.max_context)
    max_len = int(model.config.get_text_config().max_position_embeddings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    index_ids = index_token_ids(tokenizer, n)
    train, val = split_by_query(informative, cfg.val_fraction, cfg.seed)
    if not train:  # too few queries to hold any out
        train, val = val, []
    train_enc, val_enc = encode(tokenizer, train, max_len), encode(tokenizer, val, max_len)
    report = TrainReport(len(train), len(val), len(examples) - len(informative), 0)
    if val_enc:
        report.val_accuracy_before, _ = accuracy(model, val_enc, index_ids, pad_id)
        counts = [sum(i in e.best for e in train_enc) for i in range(n)]
        majority = counts.index(max(counts))
        report.val_majority = sum(majority in e.best for e in val_enc) / len(val_enc)

    if cfg.lora_r:  # peft: the adapter is saved as the field's tools (and ours) load it
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(cfg.lora_targets), bias="none")  # fmt: skip
        model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    steps_per_epoch = max(1, -(-len(train_enc) // cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    # transformers' schedulers, stepped once per optimiser step as its Trainer steps them
    scheduler = get_scheduler(cfg.lr_schedule, optimizer,
                              num_warmup_steps=round(cfg.warmup_ratio * total),
                              num_training_steps=total)  # fmt: skip
    model.train()
    from tqdm import tqdm

    bar = tqdm(total=total, desc="switcher", disable=not progress)
    lengths = [len(e.ids) for e in train_enc]
    while report.steps < total:
        for rows in grouped_batches(lengths, cfg.batch_size, rng):
            if report.steps >= total:
                break
            batch = collate([train_enc[i] for i in rows], pad_id, n)
            loss = switcher_loss(index_logprobs(model, batch, index_ids), batch["best"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            report.steps += 1
            report.losses.append(round(float(loss.detach()), 5))
            bar.update(1)
            bar.set_postfix(loss=f"{report.losses[-1]:.3f}")
    bar.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.lora_r:
        model.save_pretrained(out / ADAPTER_DIR)  # adapter_config.json + its weights
        tokenizer.save_pretrained(out / ADAPTER_DIR)
        model = model.merge_and_unload()  # the served switcher: one plain checkpoint
    model.eval()
    if val_enc:
        report.val_accuracy, report.val_accuracy_by_task = accuracy(
            model, val_enc, index_ids, pad_id
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report.seconds = round(time.time() - t0, 1)
    (out / REPORT_FILE).write_text(
        json.dumps({"init": init, "config": asdict(cfg), "report": asdict(report)}, indent=2)
    )
    return report
