"""The load test of the HTTP server, bounded and local: 64 concurrent streams for 60 s on an
app of its own (two tiny random checkpoints, 64 slots), with no error, and the memory of the
app's processes afterwards within 10% of before. `benchmarks/soak.py` prints the same figures
for the default config, with the faults."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from antiphon.deploy.app import build_app, free_port
from antiphon.deploy.config import parse_config
from tests.deploy.server import http_url
from tests.deploy.test_http import sse_events

pytestmark = pytest.mark.slow

APP = "antiphon-load"
STREAMS = 64
SECONDS = 60.0
WARM_UP_SECONDS = 10.0  # the same load first: allocator pools and caches reach their size


@pytest.fixture(scope="module")
def load_server(ray_cluster, tiny_model_dir, other_tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("load")
    deployment = {"max_ongoing_requests": 64}
    config = parse_config({
        "models": [{"name": "a", "path": str(tiny_model_dir), "deployment": deployment},
                   {"name": "b", "path": str(other_tiny_model_dir), "deployment": deployment}],
        "ensembles": [{"name": "pair", "models": ["a", "b"],
                       "policy": {"name": "round_robin", "params": {"segment_len": 4}}}],
        "serving": {"max_concurrent_requests": STREAMS, "turn_log_path": str(work / "t.atl")},
    })  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # if not yet
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield http_url(f"/{APP}"), str(work / "t.atl")
    serve.delete(APP)


def app_processes_rss(turn_log_path: str) -> dict[str, int]:
    """Bytes resident per process (keyed `pid title`) that serves the app: its replicas
    (ingress, coordinator, models), Serve's HTTP proxy, and the turn-log actor that holds the
    app's log file open; earlier tests' turn-log actors (detached, on the same cluster) never
    count. Ray titles each worker process `ray::<what it hosts>`, and `.<method>` after it
    while a call runs (`ray::TurnLogActor.append`): the key keeps what it hosts only."""
    return {f"{pid} {title.split('.')[0]}": resident_bytes(pid)
            for pid, title in ray_worker_titles()
            if f"ServeReplica:{APP}:" in title or "ProxyActor" in title
            or ("TurnLogActor" in title and holds_open(pid, turn_log_path))}  # fmt: skip


def app_processes(turn_log_path: str, expected: int, wait_s: float = 30.0) -> dict[str, int]:
    """`app_processes_rss` once all `expected` processes are there: the turn-log actor opens
    the log when the first records arrive, sent in the background after the answers (on a
    busy machine, seconds later)."""
    deadline = time.monotonic() + wait_s
    while True:
        time.sleep(2.0)
        found = app_processes_rss(turn_log_path)
        if len(found) >= expected or time.monotonic() > deadline:
            assert len(found) == expected, sorted(found)
            return found


def ray_worker_titles() -> list[tuple[int, str]]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:  # ended meanwhile
                continue
            if title.startswith("ray::"):
                found.append((int(proc.name), title))
    return found


def holds_open(pid: int, log_path: str) -> bool:
    """Whether the process holds a segment of the log (a directory of segment files) open."""
    log_dir = os.path.realpath(log_path)
    fds = Path(f"/proc/{pid}/fd")
    return any(os.path.dirname(os.path.realpath(fd)) == log_dir for fd in fds.iterdir())


def resident_bytes(pid: int) -> int:
    """A process's resident set, from /proc (the suite runs on Linux)."""
    resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def run_load(url: str, streams: int, seconds: float) -> tuple[int, list[str]]:
    """`streams` clients streaming requests back to back for `seconds`: (requests that
    ended with their done event, what went wrong with the others)."""
    deadline = time.monotonic() + seconds
    done, errors, lock = [0], [], threading.Lock()

    def client(i: int) -> None:
        n = 0
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline:
                body = {"prompt": f"Story {i}.{n}: once", "max_tokens": 24, "stream": True,
                        "temperature": 0.8, "seed": i * 100_000 + n}  # fmt: skip
                n += 1
                with http.stream("POST", f"{url}/v1/generate", json=body) as r:
                    if r.status_code != 200:
                        with lock:
                            errors.append(f"{r.status_code}: {r.read()[:200]!r}")
                        continue
                    kinds = [kind for kind, _ in sse_events(r)]
                with lock:
                    if kinds and kinds[-1] == "done" and "error" not in kinds:
                        done[0] += 1
                    else:
                        errors.append(f"stream ended with {kinds[-3:]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    return done[0], errors


def test_64_streams_for_60_s_end_without_error_and_memory_comes_back(load_server):
    url, turn_log_path = load_server
    ok, errors = run_load(url, STREAMS, WARM_UP_SECONDS)
    assert errors == [] and ok >= STREAMS
    before = app_processes(turn_log_path, 6)  # ingress, coordinator, two models, turn log, proxy
    ok, errors = run_load(url, STREAMS, SECONDS)
    assert errors == [], errors[:5]
    assert ok >= STREAMS * 2  # every client finished several streams
    time.sleep(2.0)  # the last requests' endings: sessions closed, records sent
    after = app_processes_rss(turn_log_path)
    assert after.keys() == before.keys()  # no process of the app died and came back
    grown = sum(after.values()) / sum(before.values())
    assert grown <= 1.10, f"memory grew {grown:.3f}x ({before} -> {after} B)"
