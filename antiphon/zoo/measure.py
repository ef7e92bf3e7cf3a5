"""Measure the zoo against what it must hold, on the test split, and write results/zoo.json,
results/zoo.md and results/zoo.png.

    python -m antiphon.zoo.measure                       # the shipped checkpoints
    python -m antiphon.zoo.measure --zoo zoo-build --out results

Single models run through `antiphon.actors.engine.ModelEngine` (the serving stack's engine,
in process, no Ray) unless --path local (transformers directly). Two oracles, per question,
on the tasks with one right answer:
- the switch oracle searches switch sequences over the switch ensemble (base, sft, aligned,
  expert; segments of 2 to 8 tokens, greedy): what a perfect switcher could reach;
- the deferral oracle lets a tuned base defer single tokens to an assistant (sft with the
  arithmetic expert, sft with `strong`): what a perfect Co-LLM gate could reach.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from antiphon.zoo import CHECKPOINT_DIR, NAMES
from antiphon.zoo.build import world_for
from antiphon.zoo.evaluate import (
    EvalResult,
    LocalGenerator,
    SessionGenerator,
    bootstrap_interval,
    evaluate_async,
    markdown_table,
    oracle_task_score,
    plot,
    write_json,
)
from antiphon.zoo.tasks import (
    COMPOSITIONAL_TASKS,
    CORE_TASKS,
    EXACT_TASKS,
    HELD_OUT_TASKS,
    SWITCH_ENSEMBLE,
    TASK_NAMES,
    Task,
    make_tasks,
)

ORACLE_MODELS = SWITCH_ENSEMBLE
ORACLE_SEGMENT_LENS = (2, 3, 4, 5, 6, 8)
# task -> (tuned base, assistant): where a Co-LLM gate has something to defer for
DEFERRAL_PAIRS = {"qa-arithmetic": ("sft", "expert"), "qa-knowledge": ("sft", "strong")}
PRETRAINED_PROBES = ("knowledge", "calibration", "creativity")  # base's skills
TUNED_PROBES = ("format", "safety")  # what tuning gives
HEADROOM = 30.0  # points between the best single model and the oracle switch


def _generator(model_dir: Path, name: str, backend: str):
    if backend == "local":
        return LocalGenerator(model_dir), None
    from antiphon.actors.engine import ModelEngine
    from antiphon.config import ModelSpec

    engine = ModelEngine(ModelSpec(name=name, path=str(model_dir)))
    return SessionGenerator(engine), engine


async def oracle_rows(
    tasks: dict[str, Task], gens: dict, models: Sequence[str], seg_lens: Sequence[int], policy: str
) -> list[EvalResult]:
    """One row per task: per question the best answer over the segment lengths."""
    rows = []
    for task in tasks.values():
        best = [0.0] * len(task.items)
        for seg in seg_lens:
            todo = [i for i, b in enumerate(best) if b < 1.0]
            if not todo:
                break
            sub = dataclasses.replace(task, items=tuple(task.items[i] for i in todo))
            _, found = await oracle_task_score(
                sub,
                {n: gens[n].segment for n in models},
                segment_len=seg,
                max_segments=-(-task.max_new_tokens // seg),
            )
            for i, r in zip(todo, found, strict=True):
                best[i] = max(best[i], r.score)
        rows.append(
            EvalResult(
                policy=policy,
                ensemble="+".join(models),
                task=task.name,
                split=task.split,
                n=len(task.items),
                score=round(100.0 * sum(best) / max(1, len(best)), 2),
                interval=bootstrap_interval(
                    len(best),
                    lambda idx, best=best: 100.0 * sum(best[i] for i in idx) / len(idx),
                    f"{policy}/{task.name}",
                ),
            )
        )
        print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


async def measure_async(
    zoo_dir: Path, tasks: dict[str, Task], names: Sequence[str], backend: str, seed: int
) -> list[EvalResult]:
    results: list[EvalResult] = []
    for name in names:
        gen, engine = _generator(zoo_dir / name, name, backend)
        try:
            results += await evaluate_async(
                gen, tasks.values(), policy="single", ensemble=name, seed=seed
            )
        finally:
            if engine is not None:
                await engine.shutdown()
        print(
            markdown_table([r for r in results if r["ensemble"] == name]).splitlines()[-1],
            flush=True,
        )
    oracle_models = set(ORACLE_MODELS) | {m for pair in DEFERRAL_PAIRS.values() for m in pair}
    opened = {n: _generator(zoo_dir / n, n, backend) for n in sorted(oracle_models)}
    gens = {n: g for n, (g, _) in opened.items()}
    try:
        exact = {t: tasks[t] for t in EXACT_TASKS if t in tasks}
        results += await oracle_rows(
            exact, gens, ORACLE_MODELS, ORACLE_SEGMENT_LENS, "oracle-switch"
        )
        for tname, pair in DEFERRAL_PAIRS.items():
            if tname in tasks:
                results += await oracle_rows(
                    {tname: tasks[tname]}, gens, pair, (1,), "oracle-defer"
                )
    finally:
        for _, engine in opened.values():
            if engine is not None:
                await engine.shutdown()
    return results


def check(results: Sequence[EvalResult]) -> dict[str, dict[str, object]]:
    """What the zoo must hold, each with the numbers it was decided on."""
    s = {(r["ensemble"], r["task"]): r["score"] for r in results if r["policy"] == "single"}
    singles = sorted({r["ensemble"] for r in results if r["policy"] == "single"})
    oracle = {r["task"]: r["score"] for r in results if r["policy"] == "oracle-switch"}
    family = ("base", "sft", "aligned")
    best_at = {
        t: max(family, key=lambda m, t=t: s[(m, t)]) for t in PRETRAINED_PROBES + TUNED_PROBES
    }
    headroom = {
        t: {
            "best_single": max(s[(n, t)] for n in singles),
            "best_model": max(singles, key=lambda n, t=t: s[(n, t)]),
            "oracle": oracle.get(t),
        }
        for t in CORE_TASKS + COMPOSITIONAL_TASKS + HELD_OUT_TASKS
    }
    searched = {t: v for t, v in headroom.items() if v["oracle"] is not None}
    short = [t for t, v in searched.items() if v["oracle"] - v["best_single"] < HEADROOM]
    defer = {
        r["task"]: {
            "oracle": r["score"],
            "alone": {m: s[(m, r["task"])] for m in r["ensemble"].split("+")},
        }
        for r in results
        if r["policy"] == "oracle-defer"
    }
    strong_mean = sum(s[("strong", t)] for t in PRETRAINED_PROBES) / len(PRETRAINED_PROBES)
    base_mean = sum(s[("base", t)] for t in PRETRAINED_PROBES) / len(PRETRAINED_PROBES)
    guides = max(s[("guide-tuned", "review-quality")], s[("guide-untuned", "review-quality")])
    return {
        "base_best_at_pretrained_probes": {
            "holds": all(best_at[t] == "base" for t in PRETRAINED_PROBES),
            "best": {t: best_at[t] for t in PRETRAINED_PROBES},
        },
        "tuned_best_at_tuned_probes": {
            "holds": all(best_at[t] in ("sft", "aligned") for t in TUNED_PROBES),
            "best": {t: best_at[t] for t in TUNED_PROBES},
        },
        "expert_best_at_arithmetic_probe": {
            "holds": max(singles, key=lambda n: s[(n, "arithmetic")]) == "expert",
            "expert": s[("expert", "arithmetic")],
            "sft": s[("sft", "arithmetic")],
        },
        f"oracle_switch_{HEADROOM:.0f}_above_best_single": {
            "holds": not short and len(searched) == len(headroom),
            "short": short,
            "not_searched": [t for t in headroom if t not in searched],
            "scores": headroom,
        },
        "oracle_defer_above_both_alone": {
            "holds": bool(defer)
            and all(v["oracle"] > max(v["alone"].values()) for v in defer.values()),
            "scores": defer,
        },
        "strong_beats_base": {
            "holds": strong_mean > base_mean,
            "tasks": list(PRETRAINED_PROBES),
            "strong_mean": round(strong_mean, 2),
            "base_mean": round(base_mean, 2),
        },
        "guide_tuned_higher_gold_reward": {
            "holds": s[("guide-tuned", "sentiment")] > s[("guide-untuned", "sentiment")],
            "tuned": s[("guide-tuned", "sentiment")],
            "untuned": s[("guide-untuned", "sentiment")],
        },
        "strong_writes_better_reviews_than_guides": {
            "holds": s[("strong", "review-quality")] > guides,
            "strong": s[("strong", "review-quality")],
            "best_guide": guides,
        },
    }


def interval_table(results: Sequence[EvalResult]) -> str:
    """The rows of `markdown_table`, each cell the 95% interval."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    rows = list(dict.fromkeys((r["policy"], r["ensemble"]) for r in results))
    cell = {(r["policy"], r["ensemble"], r["task"]): r.get("interval") for r in results}
    lines = [
        "| policy | ensemble | " + " | ".join(tasks) + " |",
        "|---|---|" + "---:|" * len(tasks),
    ]
    for p, e in rows:
        vals = [f"{c[0]:.1f}-{c[1]:.1f}" if (c := cell.get((p, e, t))) else "" for t in tasks]
        lines.append(f"| {p} | {e} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def report_markdown(
    results: Sequence[EvalResult], checks: dict[str, dict[str, object]], meta: dict[str, object]
) -> str:
    probes = [
        r for r in results if r["task"] not in CORE_TASKS + COMPOSITIONAL_TASKS + HELD_OUT_TASKS
    ]
    asked = [r for r in results if r not in probes]
    lines = [
        "# Zoo: what must hold (test split)",
        "",
        f"Reproduce: `python -m antiphon.zoo.measure` (seed {meta['seed']}, scale {meta['scale']}, "
        f"single models through the {meta['backend']} path; switch oracle over "
        f"{'/'.join(ORACLE_MODELS)}, segments of {'/'.join(map(str, ORACLE_SEGMENT_LENS))} "
        "tokens, greedy; deferral oracle token by token; "
        f"{meta['seconds']:.0f} s).",
        "",
        "## Tasks as users ask them (core, compositional, held-out family)",
        "",
        markdown_table(asked),
        "",
        "## Probes (one skill each, in the form it was learnt) and guide tasks",
        "",
        markdown_table(probes),
        "",
        "## 95% intervals (percentile bootstrap over the test items, 1000 resamples)",
        "",
        interval_table(asked),
        "",
        interval_table(probes),
        "",
        "## What must hold",
        "",
        "| property | holds | detail |",
        "|---|---|---|",
    ]
    for key, v in checks.items():
        detail = {k: val for k, val in v.items() if k != "holds"}
        lines.append(f"| {key} | {'yes' if v['holds'] else 'NO'} | `{json.dumps(detail)}` |")
    return "\n".join(lines) + "\n"


def measure(
    zoo_dir: Path = CHECKPOINT_DIR,
    out_dir: Path = Path("results"),
    backend: str = "engine",
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Measure and write the three files; `limit` keeps the first items of each task (a
    quick look, not the reported figures)."""
    zoo_dir = Path(zoo_dir)
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    world = world_for(manifest["scale"], manifest["seed"])
    tasks = make_tasks(world, "test", TASK_NAMES)
    if limit is not None:
        tasks = {n: dataclasses.replace(t, items=t.items[:limit]) for n, t in tasks.items()}
    t0 = time.time()
    results = asyncio.run(measure_async(zoo_dir, tasks, NAMES, backend, seed))
    checks = check(results)
    meta = {
        "seed": manifest["seed"],
        "scale": manifest["scale"],
        "backend": backend,
        "eval_seed": seed,
        "seconds": round(time.time() - t0, 1),
        "limit": limit,
    }
    out_dir = Path(out_dir)
    write_json(results, out_dir / "zoo.json", checks=checks, meta=meta)
    (out_dir / "zoo.md").write_text(report_markdown(results, checks, meta))
    plot(results, out_dir / "zoo.png")
    return {"results": results, "checks": checks, "meta": meta}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Measure the zoo's must-hold properties.")
    parser.add_argument("--zoo", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--path", choices=("engine", "local"), default="engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="items per task (a quick look)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = measure(args.zoo, args.out, args.path, args.seed, args.limit)
    print((args.out / "zoo.md").read_text())
    print(json.dumps({k: v["holds"] for k, v in out["checks"].items()}, indent=2))


if __name__ == "__main__":
    main()
