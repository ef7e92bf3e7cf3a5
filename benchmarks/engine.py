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
from antiphon.actors.engine import ModelEngine, load_checkpoint  # noqa: E402
from antiphon.actors.messages import SamplingParams  # noqa: E402
from antiphon.actors.protocol import SessionModel  # noqa: E402
from antiphon.actors.server import build_model_deployment  # noqa: E402
from antiphon.config import ModelSpec  # noqa: E402
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


def median_rate(tokens: int, run: Callable[[], None], repeats: int) -> float:
    """tokens/s of the median of `repeats` timed runs, after one untimed warm-up run."""
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return tokens / statistics.median(seconds)


def engine_rate(engine: ModelEngine, prompts: tuple[str, ...], setup: Setup) -> float:
    """Aggregate greedy tokens/s of len(prompts) sessions generating at once (open + generate)."""
    params = SamplingParams(max_new_tokens=setup.new_tokens, ignore_eos=True)

    async def one(prompt: str) -> None:
        session = await engine.open(prompt)
        await engine.generate(session.session_id, params)
        await engine.close(session.session_id)

    async def all_at_once() -> None:
        await asyncio.gather(*(one(p) for p in prompts))

    return median_rate(
        setup.new_tokens * len(prompts), lambda: asyncio.run(all_at_once()), setup.repeats
    )


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

    hf = median_rate(setup.new_tokens, hf_generate, setup.repeats)
    ours = engine_rate(engine, PROMPTS[:1], setup)
    return {
        "engine_vs_generate_b1": ours / hf,
        "engine_b1_tokens_per_s": ours,
        "generate_b1_tokens_per_s": hf,
    }


def concurrent8_vs_1(setup: Setup, engine: ModelEngine) -> dict[str, float]:
    one = engine_rate(engine, PROMPTS[:1], setup)
    passes_before = engine.stats().forward_passes
    eight = engine_rate(engine, PROMPTS[:8], setup)
    passes = (engine.stats().forward_passes - passes_before) / (setup.repeats + 1)
    return {
        "concurrent8_vs_1": eight / one,
        "engine_8_sessions_tokens_per_s": eight,
        "engine_1_session_tokens_per_s": one,
        "forward_passes_per_8_session_run": passes,
    }


def deployment_vs_engine_b1(setup: Setup, engine: ModelEngine) -> dict[str, float]:
    import ray
    from ray import serve

    per_call = 32
    calls = max(1, setup.new_tokens // per_call)
    params = SamplingParams(max_new_tokens=per_call, ignore_eos=True)

    def session_rate(model: SessionModel) -> float:
        async def turns() -> None:
            session = await model.open(PROMPTS[0])
            for _ in range(calls):
                await model.generate(session.session_id, params)
            await model.close(session.session_id)

        return median_rate(calls * per_call, lambda: asyncio.run(turns()), setup.repeats)

    direct = session_rate(engine)
    # A local cluster of our own; the replica gets as many CPUs (so torch threads, via
    # OMP_NUM_THREADS) as this process uses, so both sides run the same kernels.
    threads = torch.get_num_threads()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)  # fmt: skip
    try:
        spec = setup.spec.model_copy(update={"num_cpus": float(threads)})
        handle = serve.run(build_model_deployment(spec), name="bench", route_prefix=None)
        served = session_rate(ServeModelClient(handle))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "deployment_vs_engine_b1": served / direct,
        "deployment_b1_tokens_per_s": served,
        "engine_b1_32_per_call_tokens_per_s": direct,
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
    args = parser.parse_args()

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
