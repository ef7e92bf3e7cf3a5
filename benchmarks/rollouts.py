"""What prefix reuse saves the switcher's rollouts: forward tokens (positions the models run
on) per rollout item, with the engines' prefix reuse off and on, in one run.

    python benchmarks/rollouts.py          # prints a table, writes benchmarks/results/rollouts.json
    python benchmarks/rollouts.py --limit 1 --k 2      # quicker

The rollouts are the Switch Generation experiment's (`antiphon.training.rollouts`, the zoo's
base, sft and aligned, in-process engines, segments of 4 tokens, prefix 0 empty): per item one
random response, then n x k completions that replay its prefix, all opening sessions on the
same prompt. Both sides run the same items with the same seeds and must write the same
labels; forward tokens are counted by the engines, so the figure does not depend on the
machine's load (seconds are reported too, as a ratio measured in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from antiphon.actors.engine import ModelEngine
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.training.rollouts import RolloutConfig, RolloutStore, queries_from_tasks, run_rollouts
from antiphon.zoo.evaluate import zoo_tasks

RESULTS = Path(__file__).parent / "results" / "rollouts.json"
ENSEMBLE = ("base", "sft", "aligned")
TASKS = ("knowledge", "qa-knowledge", "safety", "arithmetic")


async def measure(prefix_reuse: bool, args: argparse.Namespace) -> dict:
    """Rollouts over fresh engines; what they fed per item."""
    engines = {
        n: ModelEngine(
            ModelSpec(name=n, path=f"zoo:{n}", max_sessions=1024, prefix_reuse=prefix_reuse)
        )
        for n in ENSEMBLE
    }
    coord = Coordinator(engines, {n: load_tokenizer(f"zoo:{n}") for n in ENSEMBLE})
    queries = queries_from_tasks(zoo_tasks("dev", TASKS), limit=args.limit)
    cfg = RolloutConfig(k=args.k, segment_len=4, prefixes_per_query=args.prefixes,
                        empty_first_prefix=True, concurrency=8)  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        examples = await run_rollouts(
            coord.generate, queries, ENSEMBLE, cfg, RolloutStore(work), progress=False
        )
    seconds = time.perf_counter() - t0
    stats = [e.stats() for e in engines.values()]
    for e in engines.values():
        await e.shutdown()
    items = len(queries) * cfg.prefixes_per_query
    return {
        "items": items,
        "forward_tokens_per_item": sum(s.forward_tokens for s in stats) / items,
        "forward_passes_per_item": sum(s.forward_passes for s in stats) / items,
        "tokens_generated_per_item": sum(s.tokens_generated for s in stats) / items,
        "reused_tokens_per_item": sum(s.reused_tokens for s in stats) / items,
        "seconds": round(seconds, 2),
        "labels": [(e.key, e.best) for e in sorted(examples, key=lambda e: e.key)],
    }


async def main(args: argparse.Namespace) -> dict:
    off = await measure(False, args)
    on = await measure(True, args)
    if on["labels"] != off["labels"]:
        raise SystemExit("prefix reuse changed the rollouts' labels: the caches are not equal")
    out = {
        "setup": {
            "ensemble": list(ENSEMBLE),
            "tasks": list(TASKS),
            "limit": args.limit,
            "k": args.k,
            "prefixes": args.prefixes,
            "items": on["items"],
        },  # fmt: skip
        "reuse_off": {k: v for k, v in off.items() if k != "labels"},
        "reuse_on": {k: v for k, v in on.items() if k != "labels"},
        "forward_tokens_on_vs_off": on["forward_tokens_per_item"] / off["forward_tokens_per_item"],
        "seconds_on_vs_off": on["seconds"] / off["seconds"],
    }
    rows = [
        ("forward tokens / item", "forward_tokens_per_item"),
        ("forward passes / item", "forward_passes_per_item"),
        ("tokens generated / item", "tokens_generated_per_item"),
        ("positions reused / item", "reused_tokens_per_item"),
        ("seconds", "seconds"),
    ]
    print("| figure | reuse off | reuse on |\n|---|---:|---:|")
    for label, key in rows:
        print(f"| {label} | {off[key]:.1f} | {on[key]:.1f} |")
    print(f"| forward tokens, on / off | | {out['forward_tokens_on_vs_off']:.3f} |")
    print(f"| seconds, on / off | | {out['seconds_on_vs_off']:.3f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=3, help="dev queries per task")
    p.add_argument("--k", type=int, default=4, help="completions per branch")
    p.add_argument("--prefixes", type=int, default=2, help="prefixes per query")
    asyncio.run(main(p.parse_args()))
