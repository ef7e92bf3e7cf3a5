"""The session engine's speed against plain transformers, and what batching sessions buys.

    python benchmarks/engine.py     # prints a table, writes benchmarks/results/engine.json
    python benchmarks/engine.py --new-tokens 64 --repeats 1      # quicker

One random-weight Llama checkpoint of a few million parameters (hidden 256, 4 layers) is written
to a temporary directory and loaded through the engine's own loader. Figures are ratios
measured in the same run, on the same model, after a warm-up:
- `engine_vs_generate_b1`: greedy tokens/s of one session through the engine (open + generate)
  / tokens/s of `model.generate(do_sample=False)` on the same prompt. Target >= 0.9.
- `concurrent8_vs_1`: aggregate tokens/s of 8 sessions generating at once through one engine
  / tokens/s of one session alone. Target >= 3.
- `deployment_vs_engine_b1`: tokens/s of one session writing its tokens 32 per generate call
  through the Ray Serve deployment (a local cluster, one replica, a DeploymentHandle) / the
  same calls on the in-process engine. Target >= 0.8.
Each figure is one function returning its rows; add a figure by adding a function to FIGURES.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.factories

from antiphon.actors.client import ServeModelClient  # noqa: E402
from antiphon.actors.engine import ModelEngine
from antiphon.actors.protocol import SessionModel  # noqa: E402
from antiphon.actors.server import build_model_deployment  # noqa: E402
from antiphon.checkpoint import load_checkpoint  # noqa: E402
from antiphon.config import ModelSpec  # noqa: E402
from antiphon.messages import SamplingParams  # noqa: E402
from tests.factories import make_tiny_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "engine.json"
PROMPTS = (
    "Once upon a time",
    "The fox went to the river and",
    "Q: What is the capital of",
    "In the village there was",
    "abc def ghi",
    "It was a dark and stormy night",
    "42 + 17 =",
    "The quick brown fox",
)


@dataclass(frozen=True)
class Setup:
    """What every figure measures on: one checkpoint and the run's settings."""

    spec: ModelSpec
    new_tokens: int
    repeats: int


def paired_rates(
    tokens: tuple[int, int], runs: tuple[Callable[[], None], Callable[[], None]], repeats: int
) -> tuple[float, float]:
    """Median tokens/s of two runs timed in turns (a, b, a, b, ...) after one warm-up each, so
    load from elsewhere on the machine hits both alike."""
    for run in runs:
        run()
    seconds: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, times in zip(runs, seconds, strict=True):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    rate_a, rate_b = (n / statistics.median(t) for n, t in zip(tokens, seconds, strict=True))
    return rate_a, rate_b


def engine_run(engine: ModelEngine, prompts: tuple[str, ...], setup: Setup) -> Callable[[], None]:
    """One greedy run of len(prompts) sessions generating at once (open + generate + close)."""
    params = SamplingParams(max_new_tokens=setup.new_tokens, ignore_eos=True)

    async def one(prompt: str) -> None:
        session = await engine.open(prompt)
        await engine.generate(session.session_id, params)
        await engine.close(session.session_id)

    async def all_at_once() -> None:
        await asyncio.gather(*(one(p) for p in prompts))

    return lambda: asyncio.run(all_at_once())


def engine_vs_generate_b1(setup: Setup, engine: ModelEngine) -> dict[str, float]:
    model, tokenizer = load_checkpoint(setup.spec)
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]], device=model.device)

    def hf_generate() -> None:
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=setup.new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )

    n = setup.new_tokens
    ours, hf = paired_rates(
        (n, n), (engine_run(engine, PROMPTS[:1], setup), hf_generate), setup.repeats
    )
    return {
        "engine_vs_generate_b1": ours / hf,
        "engine_b1_tokens_per_s": ours,
        "generate_b1_tokens_per_s": hf,
    }


def concurrent8_vs_1(setup: Setup, engine: ModelEngine) -> dict[str, float]:
    n = setup.new_tokens
    passes_before = engine.stats().forward_passes
    eight, one = paired_rates(
        (8 * n, n),
        (engine_run(engine, PROMPTS[:8], setup), engine_run(engine, PROMPTS[:1], setup)),
        setup.repeats,
    )
    # each 8-session run: about n decode steps + a few prefills, against 8n + 8 alone
    passes = (engine.stats().forward_passes - passes_before) / (setup.repeats + 1)
    return {
        "concurrent8_vs_1": eight / one,
        "engine_8_sessions_tokens_per_s": eight,
        "engine_1_session_tokens_per_s": one,
        "forward_passes_per_8_plus_1_session_runs": passes,
    }


def deployment_vs_engine_b1(setup: Setup, engine: ModelEngine) -> dict[str, float]:
    import ray
    from ray import serve

    per_call = 32
    calls = max(1, setup.new_tokens // per_call)
    params = SamplingParams(max_new_tokens=per_call, ignore_eos=True)

    def seconds(model: SessionModel) -> float:
        """Time of one session's generate calls (open and close not timed)."""

        async def turns() -> float:
            session = await model.open(PROMPTS[0])
            start = time.perf_counter()
            for _ in range(calls):
                await model.generate(session.session_id, params)
            elapsed = time.perf_counter() - start
            await model.close(session.session_id)
            return elapsed

        return asyncio.run(turns())

    # A local cluster of our own. The replica gets as many CPUs (so torch threads, through
    # OMP_NUM_THREADS) as this process uses, and Ray's default worker niceness (15) is
    # turned off: the figure is Serve's overhead, not a scheduling handicap.
    threads = torch.get_num_threads()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=threads,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024 * 1024,
        _system_config={"worker_niceness": 0},
    )
    try:
        deployment = setup.spec.deployment.model_copy(update={"num_cpus": float(threads)})
        spec = setup.spec.model_copy(update={"deployment": deployment})
        handle = serve.run(build_model_deployment(spec), name="bench-deployment", route_prefix=None)
        served_model = ServeModelClient(handle)
        seconds(engine), seconds(served_model)  # warm-up
        direct, served = [], []
        for _ in range(setup.repeats):  # interleaved, so load from elsewhere hits both alike
            direct.append(seconds(engine))
            served.append(seconds(served_model))
    finally:
        serve.shutdown()
        ray.shutdown()
    direct_rate = calls * per_call / statistics.median(direct)
    served_rate = calls * per_call / statistics.median(served)
    return {
        "deployment_vs_engine_b1": served_rate / direct_rate,
        "deployment_b1_tokens_per_s": served_rate,
        "engine_b1_32_per_call_tokens_per_s": direct_rate,
    }


FIGURES: list[Callable[[Setup, ModelEngine], dict[str, float]]] = [
    engine_vs_generate_b1,
    concurrent8_vs_1,
    deployment_vs_engine_b1,
]
TARGETS = {"engine_vs_generate_b1": 0.9, "concurrent8_vs_1": 3.0, "deployment_vs_engine_b1": 0.8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every path measured (1: a model this small gains "
        "nothing from more, and on a shared 2-core box spinning threads make timings noise)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as work:
        path = make_tiny_model(Path(work) / "bench-model", hidden_size=256, num_layers=4,
                               num_heads=4, max_context=1024)  # fmt: skip
        spec = ModelSpec(name="bench", path=str(path), device=args.device)
        setup = Setup(spec, args.new_tokens, args.repeats)
        engine = ModelEngine(spec)
        params = sum(p.numel() for p in engine.model.parameters())
        results: dict[str, float] = {}
        try:
            for figure in FIGURES:
                results.update(figure(setup, engine))
        finally:
            asyncio.run(engine.shutdown())

    print(f"\nengine benchmark: {params / 1e6:.1f}M params, {args.new_tokens} new tokens, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'figure':40s} {'value':>12s} {'target':>8s}")
    for name, value in results.items():
        target = TARGETS.get(name)
        mark = "" if target is None else (" ok" if value >= target else " MISSED")
        target_text = "" if target is None else f">= {target:g}"
        print(f"{name:40s} {value:12.3f} {target_text:>8s}{mark}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    record = {"params": params, "new_tokens": args.new_tokens, "device": args.device, **results}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
