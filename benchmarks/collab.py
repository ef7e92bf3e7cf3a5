"""Collaborative generation over the full stack: what does taking turns cost?

    python benchmarks/collab.py          # prints a table, writes benchmarks/results/collab.json
    python benchmarks/collab.py --max-tokens 64 --repeats 1      # quicker

Deploys two same-size checkpoints (the zoo's base and sft if the zoo is built, else two
random-weight ones) behind the real HTTP ingress on a local Ray, and times `/v1/generate`
(greedy, same prompts) for:
- single: one model writes everything (policy fixed, one segment for the whole budget);
- round robin between the two models with segments of 32, 8 and 1 tokens.
Figures are ratios measured in the same run: `roundrobin_segN_vs_single` = tokens/s of round
robin / tokens/s of the single model (target for 32: >= 0.85). `turn_overhead_ms` is the median
coordination time per turn outside the models: per round-robin request, its wall time minus
the time its turns spent in model calls (`model_ms` of its turn records: sync + generate,
handle round trips included), divided by its number of turns (HTTP, ingress, policy, state
and streaming are what is left). `details.marginal_turn_ms` is the other view: what one more
turn costs all in (round trips and the other model catching up included), from segment 1 vs
single.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster

PROMPTS = (
    "Once upon a time",
    "The fox went to the river and",
    "Q: What is the capital of",
    "In the village there was",
)
SEGMENTS = (32, 8, 1)
RESULTS = Path(__file__).parent / "results" / "collab.json"


def two_models(work: Path) -> list[dict[str, str]]:
    """Two same-size checkpoints: the zoo's base and sft, else two random-weight ones."""
    from antiphon.deploy.default import write_random_model, zoo_available

    if zoo_available():
        return [{"name": "first", "path": "zoo:base"}, {"name": "second", "path": "zoo:sft"}]
    return [
        {"name": "first", "path": str(write_random_model(work / "first", seed=0))},
        {"name": "second", "path": str(write_random_model(work / "second", seed=1))},
    ]


def run_config(url: str, policy: str, params: dict, max_tokens: int, repeats: int) -> dict:
    """Time every prompt `repeats` times; return tokens/s over all and the request ids."""
    body = {"ensemble": "pair", "policy": policy, "policy_params": params,
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    httpx.post(f"{url}/v1/generate", json={**body, "prompt": PROMPTS[0]}, timeout=600)  # warm up
    tokens, seconds, wall_ms = 0, 0.0, {}
    for _ in range(repeats):
        for prompt in PROMPTS:
            start = time.perf_counter()
            r = httpx.post(f"{url}/v1/generate", json={**body, "prompt": prompt}, timeout=600)
            elapsed = time.perf_counter() - start
            r.raise_for_status()
            answer = r.json()
            seconds += elapsed
            tokens += answer["usage"]["completion_tokens"]
            wall_ms[answer["id"]] = elapsed * 1000.0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "wall_ms": wall_ms}  # fmt: skip


def turns_by_request(log_path: Path, request_ids: set[str]) -> dict[str, list]:
    """The turn records of the given requests (one record per committed segment)."""
    from antiphon.training.turn_log import TurnRecord, read_records

    out: dict[str, list[TurnRecord]] = {i: [] for i in request_ids}
    for record, _ in read_records(log_path):
        if isinstance(record, TurnRecord) and record.request_id in out:
            out[record.request_id].append(record)
    return out


def overhead_per_turn_ms(wall_ms: dict[str, float], turns: dict[str, list]) -> list[float]:
    """Per request: (wall time - time in model calls) / turns."""
    out = []
    for request_id, records in turns.items():
        by_turn = {r.turn: r.model_ms for r in records}  # a turn may commit several segments
        if by_turn:
            outside = wall_ms[request_id] - sum(by_turn.values())
            out.append(outside / len(by_turn))
    return out


def wait_for_turn_log(log_path: Path, request_ids: set[str], timeout_s: float = 30.0) -> None:
    """Turn records are written after each answer, asynchronously: wait until all are in."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists() and all(turns_by_request(log_path, request_ids).values()):
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray
    from ray import serve

    from antiphon.cli import free_port
    from antiphon.config import parse_config
    from antiphon.deploy.app import build_app

    work = Path(tempfile.mkdtemp(prefix="antiphon-collab-"))
    models = two_models(work)
    config = parse_config(
        {
            "models": models,
            "ensembles": [{"name": "pair", "models": [m["name"] for m in models]}],
            "serving": {"port": free_port(), "turn_log_path": str(work / "turns.atl")},
        },
        source="collab benchmark",
    )
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": config.serving.port})
        serve.run(build_app(config), name="collab", route_prefix="/")
        url = f"http://127.0.0.1:{config.serving.port}"
        runs = {
            "single": run_config(
                url,
                "fixed",
                {"model": "first", "segment_len": args.max_tokens},
                args.max_tokens,
                args.repeats,
            ),  # fmt: skip
        }
        for seg in SEGMENTS:
            runs[f"roundrobin_seg{seg}"] = run_config(
                url, "round_robin", {"segment_len": seg}, args.max_tokens, args.repeats
            )
        log_path = work / "turns.atl"
        all_ids = {i for run in runs.values() for i in run["wall_ms"]}
        wait_for_turn_log(log_path, all_ids)
    finally:
        serve.shutdown()
        ray.shutdown()

    rr_wall = {
        i: ms for seg in SEGMENTS for i, ms in runs[f"roundrobin_seg{seg}"]["wall_ms"].items()
    }
    overheads = overhead_per_turn_ms(rr_wall, turns_by_request(log_path, set(rr_wall)))
    # all in: extra time of segment-1 round robin over single, per extra turn
    turns_seg1 = turns_by_request(log_path, set(runs["roundrobin_seg1"]["wall_ms"]))
    extra_turns = sum(len({r.turn for r in t}) - 1 for t in turns_seg1.values())
    extra_ms = sum(runs["roundrobin_seg1"]["wall_ms"].values()) - sum(
        runs["single"]["wall_ms"].values()
    )
    single = runs["single"]["tokens_per_s"]
    results: dict[str, object] = {
        f"roundrobin_seg{seg}_vs_single": runs[f"roundrobin_seg{seg}"]["tokens_per_s"] / single
        for seg in SEGMENTS
    }
    results["turn_overhead_ms"] = statistics.median(overheads) if overheads else None
    results["details"] = {
        "models": [m["path"] for m in models],
        "max_tokens": args.max_tokens,
        "requests_per_config": args.repeats * len(PROMPTS),
        "requests_measured": len(overheads),
        "marginal_turn_ms": extra_ms / extra_turns if extra_turns else None,
        "tokens_per_s": {k: round(v["tokens_per_s"], 2) for k, v in runs.items()},
        "tokens": {k: v["tokens"] for k, v in runs.items()},
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }

    print(f"{'config':<22}{'tokens':>8}{'tokens/s':>12}{'vs single':>12}")
    for name, run in runs.items():
        ratio = run["tokens_per_s"] / single
        print(f"{name:<22}{run['tokens']:>8}{run['tokens_per_s']:>12.1f}{ratio:>12.3f}")
    overhead = results["turn_overhead_ms"]
    print(f"turn_overhead_ms (median over {len(overheads)} requests): "
          f"{overhead:.2f}" if overhead is not None else "turn_overhead_ms: no turns")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    marginal = results["details"]["marginal_turn_ms"]
    if marginal is not None:
        print(f"marginal cost of one more turn, all in (seg 1 vs single): {marginal:.2f} ms")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
