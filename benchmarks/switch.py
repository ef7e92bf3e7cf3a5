"""Switch Generation over the serving stack: what does the learned switcher cost?

    python benchmarks/switch.py     # prints a table, writes benchmarks/results/switch.json
    python benchmarks/switch.py --max-tokens 64 --repeats 1     # quicker

On a private local Ray: two same-size writer checkpoints (the zoo's base and sft if the zoo
is built, else two random-weight ones) as model deployments, the coordinator deployment over
them, and a switcher checkpoint (`--switcher DIR`; default: a random-weight model the size of
a writer, which switches more often than a trained one would) in its own deployment behind a
policy actor running `switch`. Greedy, same prompts, requests one at a time, timed through
the coordinator's handle for:
- single: one model writes everything (`fixed`, segments of 32);
- switch: the switcher picks the writer of every 32-token segment (its call included).
`switch_vs_single` = tokens/s of switch / tokens/s of single, same run (target >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster

PROMPTS = (
    "Once upon a time",
    "The fox went to the river and",
    "Q: What is the capital of",
    "In the village there was",
)
SEGMENT = 32
RESULTS = Path(__file__).parent / "results" / "switch.json"


def writers(work: Path) -> list[tuple[str, str]]:
    from antiphon.deploy.default import write_random_model, zoo_available

    if zoo_available():
        return [("first", "zoo:base"), ("second", "zoo:sft")]
    return [
        ("first", str(write_random_model(work / "first", seed=0))),
        ("second", str(write_random_model(work / "second", seed=1))),
    ]


def time_policy(handle, models, policy, params, max_tokens, repeats) -> dict[str, float]:
    from antiphon.coordinator.request import GenerationRequest

    def request(prompt: str) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, models=models, policy=policy,
                                 policy_params=params, max_tokens=max_tokens)  # fmt: skip

    handle.generate.remote(request(PROMPTS[0])).result()  # warm up
    tokens, turns, seconds = 0, 0, 0.0
    for _ in range(repeats):
        for prompt in PROMPTS:
            t0 = time.perf_counter()
            result = handle.generate.remote(request(prompt)).result()
            seconds += time.perf_counter() - t0
            tokens += result.usage.completion_tokens
            turns += len(result.segments)
    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "segments": turns}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--switcher", default=None, help="switcher checkpoint (default: random)")
    parser.add_argument(
        "--in-coordinator",
        action="store_true",
        help="build `switch` inside the coordinator (no policy actor hop); default: hosted",
    )
    args = parser.parse_args()

    import ray
    from ray import serve

    from antiphon.config import ModelSpec
    from antiphon.deploy.app import build_coordinator_app
    from antiphon.deploy.default import write_random_model
    from antiphon.deploy.switcher import deploy_switch_policy, switch_policy_params

    work = Path(tempfile.mkdtemp(prefix="antiphon-switch-bench-"))
    pair = writers(work)
    switcher_path = args.switcher or str(write_random_model(work / "switcher", seed=2))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        spec = ModelSpec(name="switcher-model", path=switcher_path)
        params = {"segment_len": SEGMENT}
        actor = deploy_switch_policy(spec, params)
        hosted = {} if args.in_coordinator else {"switch": actor}
        specs = [ModelSpec(name=n, path=p) for n, p in pair]
        handle = serve.run(build_coordinator_app(specs, None, hosted), name="bench",
                           route_prefix=None)  # fmt: skip
        models = tuple(n for n, _ in pair)
        # Interleaved, so drift in the shared machine's load hits both alike.
        runs: dict[str, list[dict[str, float]]] = {"single": [], "switch": []}
        for _ in range(args.repeats):
            runs["single"].append(time_policy(handle, models, "fixed",
                                              {"model": models[0], "segment_len": SEGMENT},
                                              args.max_tokens, 1))  # fmt: skip
            runs["switch"].append(time_policy(handle, models, "switch",
                                              switch_policy_params(spec, params),
                                              args.max_tokens, 1))  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()

    def total(rows: list[dict[str, float]]) -> dict[str, float]:
        tokens = sum(r["tokens"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        return {"tokens": tokens, "seconds": round(seconds, 3),
                "tokens_per_s": round(tokens / seconds, 1),
                "segments": sum(r["segments"] for r in rows)}  # fmt: skip

    single, switch = total(runs["single"]), total(runs["switch"])
    ratio = round(switch["tokens_per_s"] / single["tokens_per_s"], 3)
    out = {
        "writers": [p for _, p in pair],
        "switcher": "random-weight" if args.switcher is None else switcher_path,
        "switch_policy_in": "coordinator" if args.in_coordinator else "policy actor",
        "segment_len": SEGMENT,
        "max_tokens": args.max_tokens,
        "prompts": len(PROMPTS),
        "repeats": args.repeats,
        "single": single,
        "switch": switch,
        "switch_vs_single": ratio,
        "target": 0.8,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'policy':<8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'segments':>9}")
    for name, row in (("single", single), ("switch", switch)):
        print(f"{name:<8} {row['tokens']:>7} {row['seconds']:>8} {row['tokens_per_s']:>8} "
              f"{row['segments']:>9}")  # fmt: skip
    print(f"switch_vs_single = {ratio} (target >= 0.8); wrote {RESULTS}")


if __name__ == "__main__":
    main()
