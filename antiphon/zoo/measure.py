"""Measure the zoo against what issue 4 says must hold, on the test split, and write
results/zoo.json, results/zoo.md and results/zoo.png.

    python -m antiphon.zoo.measure                       # the shipped checkpoints
    python -m antiphon.zoo.measure --zoo zoo-build --out results

Single models run through `antiphon.actors.engine.ModelEngine` (the serving stack's engine,
in process, no Ray) unless --path local (transformers directly). The oracle switcher searches
switch sequences over base/sft/aligned (segments of 2 to 8 tokens, greedy) per question.
"""

from __future__ import annotations

import argparse
import asyncio
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
    evaluate_async,
    markdown_table,
    oracle_task_score,
    plot,
    write_json,
)
from antiphon.zoo.tasks import COMPOSITIONAL_TASKS, CORE_TASKS, TASK_NAMES, Task, make_tasks

ORACLE_MODELS = ("base", "sft", "aligned")
ORACLE_SEGMENT_LENS = (2, 3, 4, 5, 6, 8)
PRETRAINED_TASKS = ("knowledge", "calibration", "creativity")  # what base and strong both can do


def _generator(model_dir: Path, name: str, backend: str):
    if backend == "local":
        return LocalGenerator(model_dir), None
    from antiphon.actors.engine import ModelEngine
    from antiphon.config import ModelSpec

    engine = ModelEngine(ModelSpec(name=name, path=str(model_dir)))
    return SessionGenerator(engine), engine


async def measure_async(
    zoo_dir: Path, tasks: dict[str, Task], names: Sequence[str], backend: str, seed: int
) -> tuple[list[EvalResult], dict[str, float]]:
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
    oracle: dict[str, float] = {}
    gens = {n: _generator(zoo_dir / n, n, backend) for n in ORACLE_MODELS}
    try:
        for tname in COMPOSITIONAL_TASKS:
            task = tasks[tname]
            best = [0.0] * len(task.items)
            for seg in ORACLE_SEGMENT_LENS:
                todo = [i for i, b in enumerate(best) if b < 1.0]
                sub = Task(
                    task.name,
                    task.split,
                    tuple(task.items[i] for i in todo),
                    task.samples,
                    task.max_new_tokens,
                    task.temperature,
                    task.verify,
                    task.score,
                )
                _, found = await oracle_task_score(
                    sub,
                    {n: g.segment for n, (g, _) in gens.items()},
                    segment_len=seg,
                    max_segments=-(-task.max_new_tokens // seg),
                )
                for i, r in zip(todo, found, strict=True):
                    best[i] = max(best[i], r.score)
            oracle[tname] = round(100.0 * sum(best) / max(1, len(best)), 2)
            results.append(
                EvalResult(
                    policy="oracle-switch",
                    ensemble="+".join(ORACLE_MODELS),
                    task=tname,
                    split=task.split,
                    n=len(task.items),
                    score=oracle[tname],
                )
            )
    finally:
        for _, engine in gens.values():
            if engine is not None:
                await engine.shutdown()
    return results, oracle


def check(results: Sequence[EvalResult]) -> dict[str, dict[str, object]]:
    """The issue's 'what must hold', each with the numbers it was decided on."""
    s = {(r["ensemble"], r["task"]): r["score"] for r in results if r["policy"] == "single"}
    tasks = CORE_TASKS + COMPOSITIONAL_TASKS
    base_wins = [t for t in tasks if s[("base", t)] - s[("aligned", t)] >= 15]
    aligned_wins = [t for t in tasks if s[("aligned", t)] - s[("base", t)] >= 15]
    singles = sorted({r["ensemble"] for r in results if r["policy"] == "single"})
    oracle = {r["task"]: r["score"] for r in results if r["policy"] == "oracle-switch"}
    comp = {
        t: {"best_single": max(s[(n, t)] for n in singles), "oracle": oracle.get(t, 0.0)}
        for t in COMPOSITIONAL_TASKS
    }
    comp_ok = [t for t, v in comp.items() if v["best_single"] < 50 and v["oracle"] >= 70]
    strong_mean = sum(s[("strong", t)] for t in PRETRAINED_TASKS) / len(PRETRAINED_TASKS)
    base_mean = sum(s[("base", t)] for t in PRETRAINED_TASKS) / len(PRETRAINED_TASKS)
    return {
        "base_beats_aligned_by_15_on_2": {"holds": len(base_wins) >= 2, "tasks": base_wins},
        "aligned_beats_base_by_15_on_2": {"holds": len(aligned_wins) >= 2, "tasks": aligned_wins},
        "compositional_headroom_on_2": {
            "holds": len(comp_ok) >= 2,
            "tasks": comp_ok,
            "scores": comp,
        },
        "expert_beats_sft_arithmetic_by_20": {
            "holds": s[("expert", "arithmetic")] - s[("sft", "arithmetic")] >= 20,
            "expert": s[("expert", "arithmetic")],
            "sft": s[("sft", "arithmetic")],
        },
        "strong_beats_base": {
            "holds": strong_mean > base_mean,
            "tasks": list(PRETRAINED_TASKS),
            "strong_mean": round(strong_mean, 2),
            "base_mean": round(base_mean, 2),
            "per_task": {t: [s[("strong", t)], s[("base", t)]] for t in PRETRAINED_TASKS},
        },
        "guide_tuned_higher_gold_reward": {
            "holds": s[("guide-tuned", "sentiment")] > s[("guide-untuned", "sentiment")],
            "tuned": s[("guide-tuned", "sentiment")],
            "untuned": s[("guide-untuned", "sentiment")],
        },
    }


def report_markdown(
    results: Sequence[EvalResult], checks: dict[str, dict[str, object]], meta: dict[str, object]
) -> str:
    lines = [
        "# Zoo: what must hold (test split)",
        "",
        f"Reproduce: `python -m antiphon.zoo.measure` (seed {meta['seed']}, scale {meta['scale']}, "
        f"single models through the {meta['backend']} path; oracle switch over "
        f"{'/'.join(ORACLE_MODELS)}, segments of "
        f"{'/'.join(map(str, ORACLE_SEGMENT_LENS))} tokens, greedy).",
        "",
        markdown_table(results),
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
) -> dict:
    zoo_dir = Path(zoo_dir)
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    world = world_for(manifest["scale"], manifest["seed"])
    tasks = make_tasks(world, "test", TASK_NAMES)
    t0 = time.time()
    results, _ = asyncio.run(measure_async(zoo_dir, tasks, NAMES, backend, seed))
    checks = check(results)
    meta = {
        "seed": manifest["seed"],
        "scale": manifest["scale"],
        "backend": backend,
        "eval_seed": seed,
        "seconds": round(time.time() - t0, 1),
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = measure(args.zoo, args.out, args.path, args.seed)
    print((args.out / "zoo.md").read_text())
    print(json.dumps({k: v["holds"] for k, v in out["checks"].items()}, indent=2))


if __name__ == "__main__":
    main()
