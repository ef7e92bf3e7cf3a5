"""Collaborative generation over the full stack: what does taking turns cost?

    python benchmarks/collab.py          # prints a table, writes benchmarks/results/collab.json
    python benchmarks/collab.py --max-tokens 64 --repeats 1      # quicker
    python benchmarks/collab.py --zoo       # the zoo's base and sft instead (if it is built)
    python benchmarks/collab.py --serve-throughput-optimized   # Serve's latency knob on

Deploys two same-size checkpoints (two random-weight ones; with --zoo the zoo's base and sft)
behind the real HTTP ingress on a local Ray, and times `/v1/generate` (greedy, same prompts;
the budget cut to what the models' context holds; the end token banned with a `logit_bias`
of -100, so every config writes the whole budget and tokens/s compare requests of equal
length) for:
- single: one model writes everything (policy fixed, one segment for the whole budget);
- round robin between the two models with segments of 32, 8 and 1 tokens;
in two layouts, one after the other: one deployment per model (the default), and colocated
(`serving.colocate_models`: the coordinator replica runs both models, no process hop in a turn).
Figures are ratios measured in the same run: `roundrobin_segN_vs_single` = tokens/s of round
robin / tokens/s of the single model, deployments (targets: seg 32 >= 0.95, seg 8 >= 0.85);
`colocated_roundrobin_segN_vs_single` the same colocated, against the single model colocated;
`colocated_single_vs_single` the single model colocated against deployed. And the reference
approach's round robin, written faithfully and run in this process, no HTTP
(switch_generation's writer loop: per segment the whole text re-tokenised and re-prefilled by
`generate`): `roundrobin_segN_vs_reference` = ours, deployed over HTTP, / it.

Per layout in `details.layouts`: `turn_overhead_ms`, the median over round-robin turns of a
turn's coordination time outside the models, from its turn record: `wall_ms - model_ms` (the
whole turn, from asking the policy to its segment streamed out, minus its model call -- one
`generate` carrying the other model's tokens, handle round trip included);
`request_outside_turns_ms`, the median per-request cost outside the turns (HTTP, ingress,
handle hops, request setup): request wall time minus its turns' `wall_ms`;
`marginal_turn_ms`, the all-in view: what one more turn costs (round trip and the other model
catching up included), from segment 1 vs single. Requests go over one kept-alive HTTP
connection, as a real client's would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def two_models(work: Path, zoo: bool) -> list[dict[str, str]]:
    """Two same-size checkpoints: the zoo's base and sft if asked for, else random-weight ones."""
    from antiphon.deploy.default import write_random_model, zoo_available

    if zoo:
        if not zoo_available():
            raise SystemExit("--zoo: the zoo is not built (see antiphon/zoo/build.py)")
        return [{"name": "first", "path": "zoo:base"}, {"name": "second", "path": "zoo:sft"}]
    return [
        {"name": "first", "path": str(write_random_model(work / "first", seed=0))},
        {"name": "second", "path": str(write_random_model(work / "second", seed=1))},
    ]


def run_configs(url: str, configs: dict[str, dict], max_tokens: int, repeats: int,
                eos_id: int) -> dict:  # fmt: skip
    """Time every prompt `repeats` times under every config, interleaved (config after config
    for each prompt) so a change in machine load hits all configs alike. Returns, per config,
    tokens, seconds, tokens/s and the wall time of each request by id."""
    runs = {name: {"tokens": 0, "seconds": 0.0, "wall_ms": {}} for name in configs}
    client = httpx.Client(base_url=url, timeout=600)  # one connection, kept alive
    configs = {name: {**body, "logit_bias": {str(eos_id): -100}} for name, body in configs.items()}
    for config in configs.values():  # warm up: first sessions, first policy build
        body = {**config, "ensemble": "pair", "max_tokens": max_tokens, "prompt": PROMPTS[0]}
        client.post("/v1/generate", json=body).raise_for_status()
    for _ in range(repeats):
        for prompt in PROMPTS:
            for name, body in configs.items():
                body = {**body, "ensemble": "pair", "max_tokens": max_tokens, "prompt": prompt,
                        "temperature": 0}  # fmt: skip
                start = time.perf_counter()
                r = client.post("/v1/generate", json=body)
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                answer, run = r.json(), runs[name]
                run["seconds"] += elapsed
                run["tokens"] += answer["usage"]["completion_tokens"]
                run["wall_ms"][answer["id"]] = elapsed * 1000.0
    client.close()
    for run in runs.values():
        run["tokens_per_s"] = run["tokens"] / run["seconds"]
    return runs


def turns_by_request(log_path: Path, request_ids: set[str]) -> dict[str, list]:
    """The turn records of the given requests (one record per committed segment)."""
    from antiphon.training.turn_log import TurnRecord, read_records

    out: dict[str, list[TurnRecord]] = {i: [] for i in request_ids}
    for record, _ in read_records(log_path):
        if isinstance(record, TurnRecord) and record.request_id in out:
            out[record.request_id].append(record)
    return out


def turn_overheads_ms(turns: dict[str, list]) -> list[float]:
    """Per turn: its wall time minus its time in model calls (from its turn records)."""
    out = []
    for records in turns.values():
        by_turn = {r.turn: r.wall_ms - r.model_ms for r in records}  # a turn: 1+ segments
        out += by_turn.values()
    return out


def outside_turns_ms(wall_ms: dict[str, float], turns: dict[str, list]) -> list[float]:
    """Per request: its wall time (at the client) minus the wall time of its turns."""
    out = []
    for request_id, records in turns.items():
        by_turn = {r.turn: r.wall_ms for r in records}
        out.append(wall_ms[request_id] - sum(by_turn.values()))
    return out


def wait_for_turn_log(log_path: Path, request_ids: set[str], timeout_s: float = 30.0) -> None:
    """Turn records are written after each answer, asynchronously: wait until all are in."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_path.exists() and all(turns_by_request(log_path, request_ids).values()):
            return
        time.sleep(0.2)


def end_token_id(models: list[dict[str, str]]) -> int:
    """The end token's id, the same in both models' tokenizers."""
    from transformers import AutoTokenizer

    from antiphon.checkpoint import resolve_checkpoint_path

    ids = {AutoTokenizer.from_pretrained(resolve_checkpoint_path(m["path"])).eos_token_id
           for m in models}  # fmt: skip
    if len(ids) != 1:
        raise SystemExit(f"the two models' end tokens differ: {sorted(ids)}")
    return ids.pop()


def fitting_budget(models: list[dict[str, str]], max_tokens: int) -> int:
    """max_tokens, cut so that the longest prompt plus the response fits every model's context
    (one position spare: a session that fills its context cannot write)."""
    from transformers import AutoConfig, AutoTokenizer

    from antiphon.checkpoint import resolve_checkpoint_path

    budget = max_tokens
    for m in models:
        where = resolve_checkpoint_path(m["path"])
        context = AutoConfig.from_pretrained(where).max_position_embeddings
        tokenizer = AutoTokenizer.from_pretrained(where)
        longest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
        budget = min(budget, context - longest - 1)
    return budget


LAYOUTS = {"deployments": False, "colocated": True}  # serving.colocate_models


def measure(
    models: list[dict[str, str]], work: Path, colocate: bool, port: int, args
) -> tuple[dict, dict]:
    """Deploy the pair in one layout behind the HTTP ingress on Serve's proxy at `port`, time
    every config, delete the app; the runs and their turn records."""
    from ray import serve

    from antiphon.deploy.app import build_app
    from antiphon.deploy.config import parse_config

    layout = "colocated" if colocate else "deployments"
    log_path = work / f"turns-{layout}.atl"
    config = parse_config(
        {
            "models": models,
            "ensembles": [{"name": "pair", "models": [m["name"] for m in models]}],
            "serving": {"port": port, "turn_log_path": str(log_path),
                        "colocate_models": colocate},
        },
        source="collab benchmark",
    )  # fmt: skip
    serve.run(build_app(config), name=f"collab-{layout}", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{config.serving.port}"
        configs = {
            "single": {
                "policy": "fixed",
                "policy_params": {"model": "first", "segment_len": args.max_tokens},
            }
        }
        for seg in SEGMENTS:
            configs[f"roundrobin_seg{seg}"] = {
                "policy": "round_robin",
                "policy_params": {"segment_len": seg},
            }
        runs = run_configs(url, configs, args.max_tokens, args.repeats, end_token_id(models))
        all_ids = {i for run in runs.values() for i in run["wall_ms"]}
        wait_for_turn_log(log_path, all_ids)
    finally:
        serve.delete(f"collab-{layout}")  # the next layout takes the route
    turns = {name: turns_by_request(log_path, set(run["wall_ms"])) for name, run in runs.items()}
    return runs, turns


def figures(runs: dict, turns: dict) -> dict[str, object]:
    """One layout's ratios against its own single model, and where a turn's time goes."""
    overheads = [ms for seg in SEGMENTS for ms in turn_overheads_ms(turns[f"roundrobin_seg{seg}"])]
    outside = [
        ms for name, run in runs.items() for ms in outside_turns_ms(run["wall_ms"], turns[name])
    ]
    # all in: extra time of segment-1 round robin over single, per extra turn
    extra_turns = sum(len({r.turn for r in t}) - 1 for t in turns["roundrobin_seg1"].values())
    extra_ms = sum(runs["roundrobin_seg1"]["wall_ms"].values()) - sum(
        runs["single"]["wall_ms"].values()
    )
    single = runs["single"]["tokens_per_s"]
    out: dict[str, object] = {
        f"roundrobin_seg{seg}_vs_single": runs[f"roundrobin_seg{seg}"]["tokens_per_s"] / single
        for seg in SEGMENTS
    }
    out["turn_overhead_ms"] = statistics.median(overheads) if overheads else None
    out["turns_measured"] = len(overheads)
    out["request_outside_turns_ms"] = statistics.median(outside)
    out["marginal_turn_ms"] = extra_ms / extra_turns if extra_turns else None
    out["tokens_per_s"] = {k: round(v["tokens_per_s"], 2) for k, v in runs.items()}
    out["tokens"] = {k: v["tokens"] for k, v in runs.items()}
    return out


def reference_tokens_per_s(models: list[dict[str, str]], max_tokens: int, eos_id: int) -> dict:
    """The reference approach's round robin (switch_generation's writer loop), in this
    process: per segment, the chosen model runs `generate` on the whole text so far,
    re-tokenised and re-prefilled, and the decoded segment is appended (greedy, the end token
    suppressed as in ours). Tokens/s of single (one `generate` for the whole budget) and of
    every segment length, each prompt once."""
    import torch

    from antiphon.checkpoint import load_checkpoint
    from antiphon.config import ModelSpec

    loaded = [load_checkpoint(ModelSpec(name=m["name"], path=m["path"])) for m in models]

    def tokens_per_s(segment: int) -> float:
        tokens, seconds = 0, 0.0
        for prompt in PROMPTS:
            text, written = prompt, 0
            t0 = time.perf_counter()
            while written < max_tokens:
                model, tokenizer = loaded[(written // segment) % len(loaded)]
                inputs = tokenizer(text, return_tensors="pt")
                with torch.no_grad():
                    out = model.generate(**inputs, do_sample=False, suppress_tokens=[eos_id],
                                         max_new_tokens=min(segment, max_tokens - written),
                                         pad_token_id=eos_id)  # fmt: skip
                new = out[0, inputs["input_ids"].shape[1] :]
                text += tokenizer.decode(new, skip_special_tokens=True)
                written += len(new)
            seconds += time.perf_counter() - t0
            tokens += written
        return tokens / seconds

    tokens_per_s(8)  # warm up
    out = {"single": tokens_per_s(max_tokens)}
    out.update({f"roundrobin_seg{seg}": tokens_per_s(seg) for seg in SEGMENTS})
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--zoo", action="store_true", help="the zoo's base and sft")
    parser.add_argument(
        "--serve-throughput-optimized",
        action="store_true",
        help="start the local Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Serve's own knob: user "
        "code and the router on the replica's main loop, gRPC between deployments); writes "
        "collab_throughput_optimized.json",
    )
    args = parser.parse_args()
    results_path = RESULTS
    if args.serve_throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by every process Ray starts
        results_path = RESULTS.with_name("collab_throughput_optimized.json")

    import ray
    from ray import serve

    from antiphon.deploy.app import free_port

    work = Path(tempfile.mkdtemp(prefix="antiphon-collab-"))
    models = two_models(work, args.zoo)
    args.max_tokens = fitting_budget(models, args.max_tokens)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        layouts = {name: figures(*measure(models, work, colocate, port, args))
                   for name, colocate in LAYOUTS.items()}  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
    reference = reference_tokens_per_s(models, args.max_tokens, end_token_id(models))
    shutil.rmtree(work, ignore_errors=True)  # the checkpoints and turn logs of this run

    ratios = [f"roundrobin_seg{seg}_vs_single" for seg in SEGMENTS]
    deployed, colocated = layouts["deployments"], layouts["colocated"]
    results: dict[str, object] = {key: deployed[key] for key in ratios}
    results["turn_overhead_ms"] = deployed["turn_overhead_ms"]
    results.update({f"colocated_{key}": colocated[key] for key in ratios})
    for seg in SEGMENTS:  # ours (deployed, over HTTP) against the reference at one segment
        key = f"roundrobin_seg{seg}"
        results[f"{key}_vs_reference"] = deployed["tokens_per_s"][key] / reference[key]
    results["colocated_single_vs_single"] = (
        colocated["tokens_per_s"]["single"] / deployed["tokens_per_s"]["single"]
    )
    results["details"] = {
        "models": [m["path"] if m["path"].startswith("zoo:") else "random weights" for m in models],
        "max_tokens": args.max_tokens,
        "requests_per_config": args.repeats * len(PROMPTS),
        "layouts": layouts,
        "reference_tokens_per_s": reference,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(f"{'layout':<13}{'config':<20}{'tokens':>8}{'tokens/s':>11}{'vs single':>11}")
    for layout, f in layouts.items():
        single = f["tokens_per_s"]["single"]
        for name, tps in f["tokens_per_s"].items():
            print(f"{layout:<13}{name:<20}{f['tokens'][name]:>8}{tps:>11.1f}{tps / single:>11.3f}")
    for name, tps in reference.items():
        print(f"{'reference':<13}{name:<20}{'':>8}{tps:>11.1f}{tps / reference['single']:>11.3f}")
    for layout, f in layouts.items():
        marginal = f["marginal_turn_ms"]
        print(f"{layout}: one more turn, all in (seg 1 vs single): "
              f"{marginal:.2f} ms; per request outside its turns: "
              f"{f['request_outside_turns_ms']:.2f} ms")  # fmt: skip
    results["details"]["serve_throughput_optimized"] = args.serve_throughput_optimized
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
