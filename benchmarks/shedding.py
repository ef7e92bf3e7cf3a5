"""Load shedding past capacity: how fast does a refused request learn it, and does it learn
when to come back?

    python benchmarks/shedding.py       # prints a table, writes benchmarks/results/shedding.json
    python benchmarks/shedding.py --burst 64      # a smaller burst

Deploys one random-weight checkpoint behind the real HTTP ingress on a private local Ray with
`serving.max_concurrent_requests` = 4, fills the four slots with long streams (one token a
turn), then sends `--burst` short requests at once, each on its own connection, then
`--sequential` more one after another. Every one of them should be refused (503) at once
with `Retry-After`; the table gives the refusals' latency (median, p95, max) and how many
carried the header, for the burst and one at a time. The issue's target: 503 within 100 ms.
Then it closes the streams and checks a request succeeds again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster

SLOTS = 4
RESULTS = Path(__file__).parent / "results" / "shedding.json"


def hold_slots(url: str, opened: threading.Barrier, release: threading.Event) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 400, "stream": True,
            "policy_params": {"segment_len": 1}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()  # kept: dropping it would close the connection
        next(lines)  # the first event is out: this stream holds a slot
        opened.wait()
        release.wait()


async def burst(url: str, n: int) -> list[tuple[int, float, str | None]]:
    """(status, seconds, Retry-After) of n concurrent short requests, one connection each."""

    async def one() -> tuple[int, float, str | None]:
        async with httpx.AsyncClient(timeout=120) as client:
            started = time.perf_counter()
            r = await client.post(f"{url}/v1/generate", json={"prompt": "a", "max_tokens": 2})
            return r.status_code, time.perf_counter() - started, r.headers.get("retry-after")

    return await asyncio.gather(*[one() for _ in range(n)])


def one_at_a_time(url: str, n: int) -> list[tuple[int, float, str | None]]:
    """(status, seconds, Retry-After) of n short requests sent one after another, each on a
    new connection: the refusal a client sees when the server is full but not flooded."""
    answers = []
    for _ in range(n):
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a", "max_tokens": 2}, timeout=120)
        answers.append((r.status_code, time.perf_counter() - started, r.headers.get("retry-after")))
    return answers


def refusal_figures(answers: list[tuple[int, float, str | None]], prefix: str) -> dict:
    refused = sorted(s for status, s, _ in answers if status == 503)
    with_header = sum(1 for status, _, h in answers if status == 503 and h is not None)

    def ms(seconds: float) -> float:
        return round(1000 * seconds, 1)

    p95 = refused[int(0.95 * (len(refused) - 1))] if refused else None
    return {
        f"{prefix}_requests": len(answers),
        f"{prefix}_refused_503": len(refused),
        f"{prefix}_other_status": sorted({status for status, _, _ in answers if status != 503}),
        f"{prefix}_refusal_ms_median": ms(statistics.median(refused)) if refused else None,
        f"{prefix}_refusal_ms_p95": ms(p95) if p95 is not None else None,
        f"{prefix}_refusal_ms_max": ms(refused[-1]) if refused else None,
        f"{prefix}_retry_after_share": round(with_header / len(refused), 3) if refused else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=256, help="concurrent requests past capacity")
    parser.add_argument("--sequential", type=int, default=50,
                        help="requests past capacity sent one at a time")  # fmt: skip
    args = parser.parse_args()

    import ray
    from ray import serve

    from antiphon.deploy.app import build_app, free_port
    from antiphon.deploy.config import parse_config
    from antiphon.deploy.default import write_random_model

    work = Path(tempfile.mkdtemp(prefix="antiphon-shedding-"))
    write_random_model(work / "a", seed=1)
    port = free_port()
    config = parse_config({
        "models": [{"name": "a", "path": str(work / "a")}],
        "ensembles": [{"name": "solo", "models": ["a"],
                       "policy": {"name": "round_robin", "params": {"segment_len": 1}}}],
        "serving": {"host": "127.0.0.1", "port": port, "max_concurrent_requests": SLOTS,
                    "turn_log_path": str(work / "turns.atl")},
    })  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="shedding", route_prefix="/")
        opened, release = threading.Barrier(SLOTS + 1), threading.Event()
        holders = [threading.Thread(target=hold_slots, args=(url, opened, release))
                   for _ in range(SLOTS)]  # fmt: skip
        for t in holders:
            t.start()
        opened.wait(timeout=300)
        answers = asyncio.run(burst(url, args.burst))
        sequential = one_at_a_time(url, args.sequential)
        release.set()
        for t in holders:
            t.join()
        recovered = None
        for _ in range(120):  # the closed streams free their slots once noticed
            recovered = httpx.post(f"{url}/v1/generate", json={"prompt": "a", "max_tokens": 2})
            if recovered.status_code == 200:
                break
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "slots": SLOTS,
        **refusal_figures(answers, "burst"),
        **refusal_figures(sequential, "one_at_a_time"),
        "recovered_status": recovered.status_code if recovered is not None else None,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    every_one_refused = result["burst_refused_503"] == args.burst and (
        result["one_at_a_time_refused_503"] == args.sequential
    )
    sys.exit(0 if every_one_refused and recovered.status_code == 200 else 1)


if __name__ == "__main__":
    main()
