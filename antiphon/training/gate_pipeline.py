"""Co-LLM's gate for one (base, assistant) pair, end to end: gold answers of the zoo's dev
split, the assistant's log-probabilities by teacher forcing (stored with provenance), the
weak-label gate, the marginal-likelihood gate (alone, and optionally with the base: full or
LoRA), the threshold search on held-back dev items, and a card that says what came out.

    report = await train_gate_pair(GatePairConfig(base="zoo:sft", assistant="zoo:strong",
                                                  out=Path("gates/sft+strong")))

What lands in `out`: data/ (the teacher-forced features), weak/gate.safetensors,
gate.safetensors (marginal likelihood, the gate to serve with `gate_path`), joint/ (with
--joint: a whole HF checkpoint, the trained base with its gate beside it), curves.{json,png}
(losses), thresholds.{json,png} (the sweep) and gate_card.json (eta, validation score,
deferral rate, a warning when the best eta never defers, the provenance).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from antiphon.actors.engine import ModelEngine
from antiphon.actors.gate import GATE_FILENAME, gate_fingerprint, save_gate
from antiphon.checkpoint import (
    load_checkpoint,
    load_tokenizer,
    resolve_checkpoint_path,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.errors import InvalidRequest
from antiphon.logging import get_logger
from antiphon.training.gate_data import GateData, base_forced, build_gate_data, gold_texts
from antiphon.training.gate_thresholds import (
    RATES,
    ThresholdPoint,
    best_point,
    never_defer_warning,
    plot_sweep,
    sweep,
    thresholds_at_rates,
)
from antiphon.training.gate_training import GateFit, fit_joint, fit_marginal, fit_weak_labels
from antiphon.training.policy_runs import run_policy, texts, token_share
from antiphon.zoo.evaluate import zoo_tasks
from antiphon.zoo.tasks import EXACT_TASKS, HELD_OUT_TASKS, Task

log = get_logger(__name__)

GATE_TASKS = tuple(t for t in EXACT_TASKS if t not in HELD_OUT_TASKS)
CARD_FILE = "gate_card.json"


class GatePairConfig(BaseModel):
    """What `antiphon train gate` trains, and on what."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str = Field(description="The base checkpoint (path, hub id or zoo:NAME).")
    assistant: str = Field(description="The assistant checkpoint; frozen.")
    out: Path = Field(description="Output directory.")
    tasks: tuple[str, ...] = Field(default=GATE_TASKS, description="Zoo tasks of the gold text.")
    val_every: int = Field(default=5, ge=2, description="Every n-th dev item is validation.")
    weak_steps: int = Field(default=300, ge=0)
    marginal_steps: int = Field(default=600, ge=0)
    joint: Literal["none", "full", "lora"] = Field(
        default="none", description="Also train the base with the gate (marginal likelihood)."
    )
    joint_steps: int = Field(default=200, ge=1)
    lora_rank: int = Field(default=8, ge=1)
    rates: tuple[float, ...] = Field(default=RATES, description="Deferral rates swept.")
    seed: int = 0


@dataclasses.dataclass
class GateReport:
    """What came out: the card's contents."""

    card: dict
    thresholds: dict[str, list[ThresholdPoint]]


def split_items(tasks: dict[str, Task], every: int) -> tuple[list, dict[str, Task]]:
    """Training (key, item) pairs, and the validation items as tasks of their own: every
    `every`-th item of each task is held back for validation."""
    train, val = [], {}
    for name, task in tasks.items():
        train += [(f"{name}/{i}", it) for i, it in enumerate(task.items) if i % every]
        held = tuple(it for i, it in enumerate(task.items) if i % every == 0)
        val[name] = dataclasses.replace(task, items=held)
    return train, val


def provenance(name: str, path: str, tokenizer) -> dict[str, str]:
    local = resolve_checkpoint_path(path)
    return {f"{name}": path, f"{name}_weights": weights_fingerprint(local),
            f"{name}_tokenizer": tokenizer_fingerprint(tokenizer)}  # fmt: skip


async def validation_score(
    coord: Coordinator, base: str, assistant: str, val: dict[str, Task], eta: float, seed: int
) -> tuple[float, float]:
    """(mean task score, deferral rate) of `defer` at eta over the validation tasks."""
    params = {"base": base, "assistant": assistant, "eta": eta}
    scores, runs_all = [], []
    for task in val.values():
        runs = await run_policy(coord, (base, assistant), "defer", params, task, seed=seed)
        scores.append(task.score(task.items, texts(runs)))
        runs_all += runs
    return sum(scores) / len(scores), token_share(runs_all, assistant)


async def search_thresholds(
    base_spec: ModelSpec, assistant: ModelEngine, tokenizers: dict, val: dict[str, Task],
    gates_on_val, rates: Sequence[float], seed: int,
) -> list[ThresholdPoint]:  # fmt: skip
    """The sweep of one gate, served by a fresh engine of the base that carries it."""
    base = ModelEngine(base_spec)
    coord = Coordinator(
        {base_spec.name: base, "assistant": assistant},
        {base_spec.name: tokenizers["base"], "assistant": tokenizers["assistant"]},
    )
    try:

        async def evaluate(eta: float) -> tuple[float, float]:
            return await validation_score(coord, base_spec.name, "assistant", val, eta, seed)

        return await sweep(evaluate, thresholds_at_rates(gates_on_val, rates))
    finally:
        await base.shutdown()


def write_curves(out: Path, fits: dict[str, GateFit]) -> None:
    (out / "curves.json").write_text(json.dumps({k: f.curve for k, f in fits.items()}) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, fit in fits.items():
        for split in ("train", "val"):
            pts = [(p["step"], p[split]) for p in fit.curve if split in p]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=f"{name} {split}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


@dataclasses.dataclass
class _Gates:
    """The trained gates: fit, file and the engine spec of the base that serves each."""

    fits: dict[str, GateFit]
    files: dict[str, Path]
    specs: dict[str, ModelSpec]


async def train_gate_pair(cfg: GatePairConfig) -> GateReport:
    """The whole job; see the module docstring for what it writes."""
    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    base_model, base_tok = load_checkpoint(ModelSpec(name="base", path=cfg.base))
    tokenizers = {"base": base_tok, "assistant": load_tokenizer(cfg.assistant)}
    if tokenizer_fingerprint(base_tok) != tokenizer_fingerprint(tokenizers["assistant"]):
        raise InvalidRequest(
            f"gate training compares the two models token by token: {cfg.base!r} and "
            f"{cfg.assistant!r} have different tokenizers"
        )
    train_items, val = split_items(zoo_tasks("dev", cfg.tasks), cfg.val_every)
    val_items = [(f"{n}/val{i}", it) for n, t in val.items() for i, it in enumerate(t.items)]
    texts = gold_texts(train_items + val_items, base_tok)
    n_train = len(train_items)
    assistant = ModelEngine(ModelSpec(name="assistant", path=cfg.assistant))
    try:
        source = {**provenance("base", cfg.base, base_tok),
                  **provenance("assistant", cfg.assistant, tokenizers["assistant"]),
                  "split": "dev", "tasks": list(cfg.tasks), "val_every": cfg.val_every}  # fmt: skip
        data = await build_gate_data(base_model, base_tok.pad_token_id, assistant, texts, source)
        data.save(cfg.out / "data")
        gates = _fit_gates(cfg, data, n_train, base_model, base_tok, texts[:n_train])
        write_curves(cfg.out, gates.fits)
        held = data.where(range(n_train, len(texts)))
        sweeps = {}
        for name, spec in gates.specs.items():
            if name == "joint":  # the trained base's features moved: computed again
                on_val = _joint_gates(spec, base_tok, texts[n_train:], gates.fits["joint"])
            else:
                on_val = gates.fits[name].gates(held.hidden)
            sweeps[name] = await search_thresholds(
                spec, assistant, tokenizers, val, on_val, cfg.rates, cfg.seed
            )
    finally:
        await assistant.shutdown()
    card = _card(cfg, data, gates.files, sweeps, time.perf_counter() - t0)
    (cfg.out / "thresholds.json").write_text(
        json.dumps({k: [p.as_dict() for p in v] for k, v in sweeps.items()}, indent=1) + "\n"
    )
    plot_sweep(sweeps, cfg.out / "thresholds.png", f"{cfg.base} deferring to {cfg.assistant}")
    (cfg.out / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    return GateReport(card, sweeps)


def _fit_gates(cfg, data: GateData, n_train: int, base_model, tokenizer, train_texts) -> _Gates:
    """The weak-label gate, the marginal-likelihood gate from it, and with `cfg.joint` the
    gate trained with the base; each saved where it is served from."""
    train = data.where(range(n_train))
    held = data.where(range(n_train, len(data.keys)))
    fits = {"weak_label": fit_weak_labels(train, steps=cfg.weak_steps, val=held)}
    fits["marginal"] = fit_marginal(
        train, init=fits["weak_label"], steps=cfg.marginal_steps, val=held
    )
    (cfg.out / "weak").mkdir(exist_ok=True)
    files = {"weak_label": cfg.out / "weak" / GATE_FILENAME, "marginal": cfg.out / GATE_FILENAME}
    for name, file in files.items():
        save_gate(file, fits[name].weight, fits[name].bias)
    specs = {k: ModelSpec(name="base", path=cfg.base, gate_path=str(f)) for k, f in files.items()}
    if cfg.joint != "none":
        joint_dir = _train_joint(cfg, base_model, tokenizer, train_texts, data, fits)
        files["joint"] = joint_dir / GATE_FILENAME
        specs["joint"] = ModelSpec(name="base", path=str(joint_dir))
    return _Gates(fits, files, specs)


def _joint_gates(spec: ModelSpec, tokenizer, texts_val, fit: GateFit):
    model, _ = load_checkpoint(spec)
    return fit.gates(base_forced(model, texts_val, tokenizer.pad_token_id)["hidden"])


def _train_joint(cfg, base_model, tokenizer, train_texts, data: GateData, fits) -> Path:
    """Gate + base on the marginal likelihood; saved as a whole checkpoint with its gate."""
    asst = [data.asst_logprobs[data.example == i].tolist() for i in range(len(train_texts))]
    model, fits["joint"] = fit_joint(
        base_model, train_texts, asst, init=fits["marginal"], pad_id=tokenizer.pad_token_id,
        steps=cfg.joint_steps, lora_rank=cfg.lora_rank if cfg.joint == "lora" else 0,
        seed=cfg.seed,
    )  # fmt: skip
    joint_dir = cfg.out / "joint"
    model.save_pretrained(joint_dir)
    tokenizer.save_pretrained(joint_dir)
    save_gate(joint_dir / GATE_FILENAME, fits["joint"].weight, fits["joint"].bias)
    return joint_dir


def _card(cfg: GatePairConfig, data: GateData, files, sweeps, seconds: float) -> dict:
    gates = {}
    for name, points in sweeps.items():
        best = best_point(points)
        warning = never_defer_warning(points, best)
        if warning:
            log.warning("gate_never_defers", gate=name, detail=warning)
        gates[name] = {
            "file": str(files[name]), "fingerprint": gate_fingerprint(files[name]),
            "eta": best.eta, "val_score": round(best.score, 2),
            "val_deferral_rate": round(best.deferral_rate, 4), "warning": warning,
        }  # fmt: skip
    return {
        "base": cfg.base, "assistant": cfg.assistant, "gates": gates,
        "serve": {"gate_path": str(files["marginal"]), "policy": "defer",
                  "policy_params": {"eta": gates["marginal"]["eta"]}},
        "provenance": data.provenance, "config": json.loads(cfg.model_dump_json()),
        "seconds": round(seconds, 1),
    }  # fmt: skip
