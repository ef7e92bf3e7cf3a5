"""`antiphon train switcher`: rollouts on the dev split of zoo tasks, then supervised training
of the switcher on their labels.

    python -m antiphon.experiments.train_switcher --ensemble base,sft,aligned \\
        --tasks knowledge safety qa-knowledge --out runs/switcher --k 4 --limit 20
    # on a Ray cluster (models and coordinator as Serve deployments, rollouts as requests):
    ray job submit -- python -m antiphon.experiments.train_switcher --ray \\
        --ensemble base,sft,aligned ...

`--ensemble` names zoo checkpoints (`base,sft,aligned`) or NAME=DIR pairs of any HF
checkpoints; `--zoo-dir` reads the zoo from a build directory instead of the package.
Output: OUT/rollouts/ (examples.jsonl, provenance.json; a rerun resumes) and OUT/switcher/
(the HF checkpoint the `switch` policy loads, with switcher_training.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

# The heavy modules (torch, transformers) are imported where used, so `antiphon --help` and
# argument errors stay fast: the `antiphon` command builds its parser from `add_arguments`.
if TYPE_CHECKING:
    from antiphon.training.rollouts import Generate, RolloutConfig, RolloutQuery
    from antiphon.training.switcher_training import SwitcherTrainConfig


ROLLOUT_APP = "switcher-rollouts"  # the Serve app `--ray` deploys (models and coordinator)


def zoo_model_path(name: str, zoo_dir: Path | None) -> str:
    return str(zoo_dir / name) if zoo_dir is not None else f"zoo:{name}"


def parse_ensemble(text: str, zoo_dir: Path | None) -> list[tuple[str, str]]:
    """'base,sft' -> zoo checkpoints; 'a=/ckpt/a,b=/ckpt/b' -> any checkpoints."""
    out = []
    for part in text.split(","):
        name, sep, path = part.partition("=")
        out.append((name, path) if sep else (name, zoo_model_path(name, zoo_dir)))
    return out


@asynccontextmanager
async def local_coordinator(models: Sequence[tuple[str, str]]):
    """A `Generate` over an in-process coordinator and engines (no Ray)."""
    from antiphon.actors.engine import ModelEngine
    from antiphon.checkpoint import load_tokenizer
    from antiphon.config import ModelSpec
    from antiphon.coordinator.loop import Coordinator

    engines = {n: ModelEngine(ModelSpec(name=n, path=p)) for n, p in models}
    tokenizers = {n: load_tokenizer(p) for n, p in models}
    try:
        yield Coordinator(engines, tokenizers).generate
    finally:
        for e in engines.values():
            await e.shutdown()


def ray_coordinator(models: Sequence[tuple[str, str]]) -> Generate:
    """Deploy the models and a coordinator on the Ray cluster this process joins."""
    import ray
    from ray import serve

    from antiphon.config import ModelSpec
    from antiphon.deploy.app import build_coordinator_app

    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=False)
    specs = [ModelSpec(name=n, path=p) for n, p in models]
    from antiphon.training.rollouts import serve_generate

    handle = serve.run(build_coordinator_app(specs), name=ROLLOUT_APP, route_prefix=None)
    return serve_generate(handle)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="antiphon train switcher", description=__doc__.split("\n")[0])
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `antiphon train switcher` (shared by this module's own entry point)."""
    p.add_argument("--ensemble", required=True, help="base,sft,aligned or NAME=DIR,...")
    p.add_argument("--tasks", nargs="+", required=True, help="zoo task names")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--zoo-dir", type=Path, default=None, help="zoo build dir (default: package)")
    p.add_argument("--split", default="dev")
    add_rollout_arguments(p)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--init", default=None, help="switcher init checkpoint (default: zoo sft)")
    p.add_argument("--ray", action="store_true", help="run the rollouts on a Ray cluster")


def add_rollout_arguments(p: argparse.ArgumentParser) -> None:
    """Rollout and switcher-training options (`antiphon train switcher` and the experiment)."""
    p.add_argument("--limit", type=int, default=60, help="dev queries per task")
    p.add_argument("--k", type=int, default=8, help="random-switch completions per branch")
    p.add_argument("--prefixes", type=int, default=6, help="prefixes per query")
    p.add_argument("--segment-len", type=int, default=4, help="tokens per segment")
    p.add_argument(
        "--empty-first-prefix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefix 0 of every query is empty: label the first decision too",
    )
    p.add_argument(
        "--dense-reward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score exact-answer (compositional) rollouts by prefix credit",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-schedule", default="constant", help="constant, linear, cosine, ...")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of steps warming up")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lora-r", type=int, default=0, help="0: full fine-tune")
    p.add_argument("--max-context", type=int, default=1024, help="switcher context (0: keep)")


def rollout_config(args: argparse.Namespace, concurrency: int = 16) -> RolloutConfig:
    from antiphon.training.rollouts import RolloutConfig

    return RolloutConfig(k=args.k, segment_len=args.segment_len, prefixes_per_query=args.prefixes,
                         empty_first_prefix=args.empty_first_prefix, seed=args.seed,
                         concurrency=concurrency)  # fmt: skip


def rollout_queries(tasks: dict, args: argparse.Namespace) -> list[RolloutQuery]:
    """The dev queries of zoo tasks. Random completions almost never write an exact-answer
    task's whole sentence, so every candidate's utility would be 0 and the query would teach
    nothing: with --dense-reward those tasks' rollouts are scored by prefix credit."""
    from antiphon.training.rollouts import queries_from_tasks
    from antiphon.zoo.tasks import EXACT_TASKS
    from antiphon.zoo.verifiers import prefix_credit

    def credit(item, text: str) -> float:
        return prefix_credit(text, item.reference)

    rewards = {t: credit for t in EXACT_TASKS} if args.dense_reward else {}
    return queries_from_tasks(tasks, args.limit, rewards)


def train_config(args: argparse.Namespace) -> SwitcherTrainConfig:
    from antiphon.training.switcher_training import SwitcherTrainConfig

    return SwitcherTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               lora_r=args.lora_r, max_context=args.max_context or None,
                               lr_schedule=args.lr_schedule, warmup_ratio=args.warmup_ratio,
                               seed=args.seed)  # fmt: skip


async def rollouts(args: argparse.Namespace, models: list[tuple[str, str]]) -> list:
    from antiphon.training.rollouts import RolloutStore, run_rollouts
    from antiphon.zoo.evaluate import zoo_tasks

    queries = rollout_queries(zoo_tasks(args.split, args.tasks, args.zoo_dir), args)
    cfg = rollout_config(args, args.concurrency)
    store = RolloutStore(args.out / "rollouts")
    provenance = {"ensemble": dict(models), "split": args.split, "limit": args.limit}
    if args.ray:
        return await run_rollouts(ray_coordinator(models), queries, [n for n, _ in models], cfg,
                                  store, provenance)  # fmt: skip
    async with local_coordinator(models) as generate:
        return await run_rollouts(generate, queries, [n for n, _ in models], cfg, store, provenance)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run rollouts (resumable) and train the switcher; print and return the report."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    """`antiphon train switcher` with parsed options."""
    from dataclasses import asdict

    from antiphon.training.switcher_training import train_switcher

    models = parse_ensemble(args.ensemble, args.zoo_dir)
    examples = asyncio.run(rollouts(args, models))
    init = args.init or zoo_model_path("sft", args.zoo_dir)
    report = asdict(train_switcher(examples, init, args.out / "switcher", train_config(args)))
    report.pop("losses")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
