"""Where a turn's time goes: the round trips a turn is made of, one by one.

    python benchmarks/hops.py      # prints a table, writes benchmarks/results/hops.json
    python benchmarks/hops.py --serve-throughput-optimized   # with Serve's latency knob on
                                   # (writes hops_throughput_optimized.json)

On a private local Ray, with one tiny random-weight checkpoint, the median over `--calls`
calls (after a warm-up) of:
- `ray_actor_ms`: a no-op method of a plain Ray actor;
- `serve_handle_ms`: a no-op method of a Serve deployment, through a DeploymentHandle;
- `engine_generate_ms`: a one-token `generate` on a session of the engine in this process
  (what a colocated turn's model call costs);
- `serve_generate_ms`: the same call on the checkpoint's model deployment through Serve
  (`ServeModelClient(direct=False)`: the handle, the session-affinity router, the replica's
  shim), as an autoscaled model's calls go;
- `deployment_generate_ms`: the same call as a deployed model's turn makes it
  (`ServeModelClient`: over the direct channel to the session's replica after its first call).
`hop_ms` = deployment_generate_ms - engine_generate_ms and `serve_hop_ms` = serve_generate_ms -
engine_generate_ms, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster

RESULTS = Path(__file__).parent / "results" / "hops.json"


async def median_ms(call, calls: int) -> float:
    """Median milliseconds of `await call()` over `calls` calls, after five warm-ups."""
    for _ in range(5):
        await call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


async def measure(calls: int, work: Path) -> dict[str, float]:
    import ray
    from ray import serve

    from antiphon.actors.client import ServeModelClient
    from antiphon.actors.engine import ModelEngine
    from antiphon.actors.server import build_model_deployment
    from antiphon.config import ModelSpec
    from antiphon.deploy.default import write_random_model
    from antiphon.messages import SamplingParams

    @ray.remote
    class Echo:
        def ping(self) -> None:
            return None

    @serve.deployment
    class ServeEcho:
        def ping(self) -> None:
            return None

    spec = ModelSpec(name="model", path=str(write_random_model(work / "model", seed=0)))
    actor = Echo.remote()
    echo = serve.run(ServeEcho.bind(), name="echo", route_prefix=None)
    model_handle = serve.run(build_model_deployment(spec), name="model", route_prefix=None)
    deployed, through_serve = ServeModelClient(model_handle), ServeModelClient(model_handle, False)
    engine = ModelEngine(spec)
    one_token = SamplingParams(max_new_tokens=1, ignore_eos=True)

    async def generate_ms(model) -> float:
        session = await model.open("Once upon a time")
        try:
            return await median_ms(lambda: model.generate(session.session_id, one_token), calls)
        finally:
            await model.close(session.session_id)

    out = {
        "ray_actor_ms": await median_ms(lambda: actor.ping.remote(), calls),
        "serve_handle_ms": await median_ms(lambda: echo.ping.remote(), calls),
        "engine_generate_ms": await generate_ms(engine),
        "serve_generate_ms": await generate_ms(through_serve),
        "deployment_generate_ms": await generate_ms(deployed),
    }
    await engine.shutdown()
    await serve.shutdown_async()  # in this loop: the handles' routers are bound to it
    out["hop_ms"] = round(out["deployment_generate_ms"] - out["engine_generate_ms"], 3)
    out["serve_hop_ms"] = round(out["serve_generate_ms"] - out["engine_generate_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument(
        "--serve-throughput-optimized",
        action="store_true",
        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for every process Ray starts",
    )
    args = parser.parse_args()
    results_path = RESULTS
    if args.serve_throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        results_path = RESULTS.with_name("hops_throughput_optimized.json")

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as work:
            out = asyncio.run(measure(args.calls, Path(work)))
    finally:
        ray.shutdown()
    out["serve_throughput_optimized"] = args.serve_throughput_optimized
    for key, value in out.items():
        print(f"{key:<28} {value}")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
