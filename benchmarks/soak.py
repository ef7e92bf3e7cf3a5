"""Soak and faults: does the default deployment hold steady under a full load, refuse what
it cannot take at once, and lose nothing when a piece of it dies?

    python benchmarks/soak.py        # full: 64 streams for 60 s, then the faults
    python benchmarks/soak.py --seconds 10 --streams 8 --fault-streams 4     # a quick run

Deploys the default config (`antiphon.deploy.default.default_config()`: the zoo's base, sft
and aligned checkpoints in turns, round robin, CPU) behind the real HTTP ingress on a private
local Ray, with `serving.max_concurrent_requests` = `--streams`, and runs three phases; one
table at the end (phase | figure | value | target | holds), also in
benchmarks/results/soak.json:

1. load: a short warm-up, then `--streams` clients each send streaming `/v1/generate`
   requests back to back for `--seconds` (SSE; an error is a status other than 200, an
   `error` event, or a stream that does not end with `done`). Requests, errors, requests/s,
   p50/p95 stream latency, and the memory of the cluster's processes (sum of RSS) after the
   warm-up and a few seconds after the load. Targets: 0 errors; after within 10% of before.
2. refusal: `--streams` long streams (one token a turn) hold every slot; 50 short requests,
   one at a time, each on a new connection. Targets: every one 503, within 100 ms, with
   Retry-After; the table also says whether every holder was still open at the last one.
3. faults, each while `--fault-streams` streams are under way (every one has 2 events):
   kill the `base` model replica, the coordinator replica (Serve starts another of each),
   then crash the turn-log actor (Ray restarts it). Per fault: streams lost, the longest
   stall between two events of a stream, turns lost (stream ids with no turn record in the
   log), and what /health (polled every 0.25 s) said. Targets: no stream and no turn lost.

The zoo's models end most answers with end-of-sequence within a few dozen tokens, so the
holders and the fault streams use the prompt the ensemble answers longest with their
parameters, measured first (`longest_answer`). Memory is the sum of RSS over the cluster's
processes, the driver (the load generator) left out (`cluster_processes`).

Exit code 0 if every target holds, else 1; the table and the JSON are written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from antiphon.client import sse_events

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster

APP_NAME = "soak"
RESULTS = Path(__file__).parent / "results" / "soak.json"
WARMUP_REQUESTS = 4
SETTLE_S = 3.0  # after the load stops, before memory is measured again
MEMORY_TARGET = 1.10  # after / before
REFUSALS = 50
REFUSAL_TARGET_MS = 100.0
HEALTH_EVERY_S = 0.25
TURN_LOG_WAIT_S = 30.0  # records are sent after the answer, without waiting for the disk
RECOVERY_WAIT_S = 180.0  # a killed replica's replacement loads its checkpoint first

OPENINGS = ("Once upon a time", "The capital of", "Tell me about", "In the morning",
            "A story about", "Q: Where is", "The old king said", "Here is a list of")  # fmt: skip
ANIMALS = ("fox", "owl", "bear", "wolf", "cat", "dog", "hare", "deer")  # of the zoo's world
SUBJECTS = ("the river", "a small dog", "the city", "two friends", "the market",
            "a red door", "the winter", "the ship")  # fmt: skip


def prompt(n: int) -> str:
    """The n-th of 64 short prompts (varied, so the models' answers are not all one)."""
    return f"{OPENINGS[n % len(OPENINGS)]} {SUBJECTS[(n // len(OPENINGS)) % len(SUBJECTS)]}"


def story_prompt(n: int) -> str:
    """The zoo's story question (answered with a story of ~90 characters, a token each)."""
    return f"Q: Write a short story about a {ANIMALS[n % len(ANIMALS)]}.\nA:"


# --- one streamed request ---------------------------------------------------------------------


@dataclass
class Stream:
    """What one streaming `/v1/generate` request got: status, events as they arrived."""

    started: float
    status: int | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (time, event, data)
    failure: str | None = None  # an HTTP error, a non-200 body, or an exception
    ended: float | None = None

    @property
    def ok(self) -> bool:
        """200, no `error` event, and the last event is `done`."""
        return (
            self.status == 200
            and self.failure is None
            and not any(event == "error" for _, event, _ in self.events)
            and bool(self.events)
            and self.events[-1][1] == "done"
        )

    def why_not_ok(self) -> str:
        if self.failure is not None:
            return self.failure
        errors = [data for _, event, data in self.events if event == "error"]
        if errors:
            return f"error event: {errors[0][:200]}"
        return f"ended after {self.events[-1][1] if self.events else 'no'} event"

    @property
    def request_id(self) -> str | None:
        """The `id` of its events (the `done` event's, or a segment's when none came)."""
        for _, _, data in reversed(self.events):
            try:
                found = json.loads(data).get("id")
            except (ValueError, AttributeError):
                continue
            if found:
                return found
        return None

    @property
    def latency(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def finish(self) -> str:
        """Why it ended: the `done` event's finish reason (eos, length, ...), else why not ok."""
        if self.ok:
            return str(json.loads(self.events[-1][2]).get("finish_reason"))
        return self.why_not_ok()[:120]

    @property
    def tokens(self) -> int:
        """Tokens written, from its segment events."""
        counts = []
        for _, event, data in self.events:
            if event == "segment":
                counts.append(json.loads(data).get("num_tokens", 0))
        return sum(counts)

    @property
    def segment_indexes(self) -> list[int]:
        """The `index` of each segment event."""
        return [json.loads(d)["index"] for _, event, d in self.events if event == "segment"]

    @property
    def longest_gap(self) -> float:
        """The largest gap between two consecutive events (0 with fewer than two)."""
        times = [t for t, _, _ in self.events]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def stream_generate(
    client: httpx.Client,
    url: str,
    body: dict,
    on_event: Callable[[Stream], bool] | None = None,
) -> Stream:
    """Send one streaming request and read it to the end of the response (not just to `done`:
    the server frees the request's slot before it ends the body, so a client that sends its
    next request after that never races its own last one). `on_event` returning True closes
    the stream early (a holder being released)."""
    stream = Stream(started=time.monotonic())
    try:
        with client.stream("POST", f"{url}/v1/generate", json=body) as r:
            stream.status = r.status_code
            if r.status_code != 200:
                stream.failure = f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}"
            else:
                for event, data in sse_events(r.iter_lines()):
                    stream.events.append((time.monotonic(), event, data))
                    if on_event is not None and on_event(stream):
                        break
    except httpx.HTTPError as e:
        stream.failure = f"{type(e).__name__}: {e}"
    stream.ended = time.monotonic()
    return stream


def short_request_ok(url: str) -> bool:
    """One short non-streamed request answered 200."""
    try:
        body = {"prompt": "a", "max_tokens": 2}
        return httpx.post(f"{url}/v1/generate", json=body, timeout=60).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until_serving(url: str, within_s: float = RECOVERY_WAIT_S) -> float | None:
    """Seconds until a short request succeeds (Serve restarts what was killed), or None."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if short_request_ok(url):
            return round(time.monotonic() - started, 2)
        time.sleep(0.5)
    return None


def summary(streams: list[Stream]) -> dict:
    """How a group of streams ended: finish reasons counted, median tokens and events."""
    finishes: dict[str, int] = {}
    for s in streams:
        finishes[s.finish] = finishes.get(s.finish, 0) + 1
    return {
        "finish": finishes,
        "tokens_median": statistics.median(s.tokens for s in streams) if streams else None,
        "events_median": statistics.median(len(s.events) for s in streams) if streams else None,
        "seconds_median": round(statistics.median(s.latency for s in streams), 2)
        if streams
        else None,
    }


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile by rank (as shedding.py: sorted[int(q * (n - 1))]); None if empty."""
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else None


def ms(seconds: float | None) -> float | None:
    return round(1000 * seconds, 1) if seconds is not None else None


# --- memory -----------------------------------------------------------------------------------


def cluster_processes(session_dir: str) -> list:
    """Every process of this private Ray cluster, the driver left out (it is the load
    generator here, and its threads would count against the server).

    That is: the driver's descendants (`ray.init(address="local")` starts the GCS and the
    raylet as its children; the raylet forks the workers: Serve's controller, proxy and
    replicas, the turn-log actor), plus any process whose command line names this cluster's
    session directory (one re-parented away from the tree would still count; another
    cluster's processes name their own session directory, so never count)."""
    import psutil  # in the lock (peft needs it); Ray also ships a copy

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if session_dir in cmdline and p.pid != me.pid:
            found.setdefault(p.pid, p)
    return list(found.values())


def cluster_rss_mib(session_dir: str) -> tuple[float, int]:
    """(sum of RSS in MiB, number of processes) of the cluster (shared pages count in each
    process that maps them, the same way before and after, so the ratio compares)."""
    import psutil

    total, count = 0, 0
    for p in cluster_processes(session_dir):
        try:
            total += p.memory_info().rss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a worker that exited meanwhile
    return round(total / 2**20, 1), count


# --- phase 1: load ----------------------------------------------------------------------------


def load_body(n: int) -> dict:
    return {"prompt": prompt(n), "max_tokens": 32, "stream": True}


def run_load(url: str, streams: int, seconds: float, session_dir: str) -> dict:
    """`streams` clients, each sending streaming requests back to back (one kept-alive
    connection each, as a real client's) for `seconds`; memory before, during and after."""
    with httpx.Client(timeout=120) as client:  # warm-up: every model has run, the log exists
        warmup = [stream_generate(client, url, load_body(n)) for n in range(WARMUP_REQUESTS)]
    time.sleep(SETTLE_S)
    before, processes = cluster_rss_mib(session_dir)

    done: list[list[Stream]] = [[] for _ in range(streams)]
    stop_at = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = i
            while time.monotonic() < stop_at:
                done[i].append(stream_generate(client, url, load_body(n)))
                n += streams

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    # Memory during the load too: a climb and a plateau look alike in two numbers.
    during = []
    while time.monotonic() < stop_at:
        time.sleep(min(5.0, max(0.0, stop_at - time.monotonic())))
        during.append((round(time.monotonic() - started, 1), cluster_rss_mib(session_dir)[0]))
    for t in threads:
        t.join()
    time.sleep(SETTLE_S)
    after, processes_after = cluster_rss_mib(session_dir)

    results = [s for per_client in done for s in per_client]
    # until the last request ended: those sent before the deadline all count
    elapsed = max((s.ended or started for s in results), default=time.monotonic()) - started
    failed = [s for s in results if not s.ok]
    latencies = [s.latency for s in results if s.ok]
    return {
        "warmup_ok": sum(s.ok for s in warmup),
        "warmup_requests": len(warmup),
        "streams": streams,
        "seconds": seconds,
        "elapsed_s": round(elapsed, 1),
        "requests": len(results),
        "errors": len(failed),
        "requests_per_s": round(len(results) / elapsed, 2),
        "latency_ms_p50": ms(percentile(latencies, 0.5)),
        "latency_ms_p95": ms(percentile(latencies, 0.95)),
        "streams_ended": summary(results),
        "memory_mib_before": before,
        "memory_mib_after": after,
        "memory_ratio": round(after / before, 3),
        "memory_processes": [processes, processes_after],
        "memory_mib_during": during,
    }


# --- streams that last ------------------------------------------------------------------------


def longest_answer(
    url: str, candidates: list[str], params: dict, at_once: int
) -> tuple[str, int, dict[str, int]]:
    """The candidate prompt the ensemble answers at the greatest length with `params`, its
    tokens, and every candidate's. The zoo's models end most answers with end-of-sequence
    after a few tokens or a few dozen (greedy, so always the same): a stream that must outlast
    the refusals, or still be under way when a fault lands, asks what keeps them writing."""
    tokens: dict[str, int] = {}

    def measure(p: str) -> None:
        r = httpx.post(f"{url}/v1/generate", json={"prompt": p, **params}, timeout=300)
        tokens[p] = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0

    for start in range(0, len(candidates), at_once):  # within the slots, so none is refused
        some = candidates[start : start + at_once]
        batch = [threading.Thread(target=measure, args=(p,)) for p in some]
        for t in batch:
            t.start()
        for t in batch:
            t.join()
    best = max(candidates, key=lambda p: tokens[p])
    return best, tokens[best], tokens


def long_candidates() -> list[str]:
    """Prompts that may start a long answer: the zoo's story question and story openings."""
    opening = [f"Once upon a time, a {animal} lived near the" for animal in ANIMALS]
    return [story_prompt(n) for n in range(len(ANIMALS))] + opening + [prompt(n) for n in range(8)]


# --- phase 2: refusal past capacity -----------------------------------------------------------


HOLD_PARAMS = {"max_tokens": 400, "policy_params": {"segment_len": 1}}  # one token a turn


def run_refusal(url: str, slots: int, n: int = REFUSALS) -> dict:
    """Hold every slot with a long stream, then send `n` short requests one at a time, each
    on a new connection: (status, latency, Retry-After) of each; then release the holders."""
    hold_prompt, hold_tokens, candidates = longest_answer(
        url, long_candidates(), HOLD_PARAMS, min(8, slots)
    )
    hold_body = {"prompt": hold_prompt, "stream": True, **HOLD_PARAMS}
    release = threading.Event()
    opened = threading.Semaphore(0)
    holders: list[Stream | None] = [None] * slots

    def hold(i: int) -> None:
        def on_event(stream: Stream) -> bool:
            holders[i] = stream
            if len(stream.events) == 1:
                opened.release()  # the first event is out: this stream holds a slot
            return release.is_set()  # keep reading (so an early end shows) until released

        with httpx.Client(timeout=600) as client:
            holders[i] = stream_generate(client, url, hold_body, on_event)
        if not holders[i].events:
            opened.release()  # refused or failed: do not wait for it forever

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(slots)]
    for t in threads:
        t.start()
    opening = time.monotonic()
    for _ in range(slots):
        opened.acquire(timeout=300)
    opened_s = time.monotonic() - opening

    answers = []
    for _ in range(n):
        with httpx.Client(timeout=60) as client:  # a new connection for each
            began = time.perf_counter()
            r = client.post(f"{url}/v1/generate", json={"prompt": "a", "max_tokens": 2})
            answers.append(
                (r.status_code, time.perf_counter() - began, r.headers.get("retry-after"))
            )
    last_sent = time.monotonic()
    # Did the holders really hold every slot the whole time? One that ended early freed it.
    held_throughout = sum(
        1 for s in holders if s is not None and s.status == 200 and (s.ended or 1e18) > last_sent
    )
    release.set()
    for t in threads:
        t.join(timeout=120)
    recovered_s = wait_until_serving(url)

    refused = [s for status, s, _ in answers if status == 503]
    with_header = sum(1 for status, _, h in answers if status == 503 and h is not None)
    return {
        "slots": slots,
        "hold_prompt": hold_prompt,
        "hold_prompt_tokens": hold_tokens,
        "hold_candidates_tokens": candidates,
        "holders_opened_s": round(opened_s, 1),
        "holders_held_throughout": held_throughout,
        "holders_ended": summary([s for s in holders if s is not None]),
        "requests": n,
        "refused_503": len(refused),
        "other_status": sorted({status for status, _, _ in answers if status != 503}),
        "refusal_ms_median": ms(statistics.median(refused)) if refused else None,
        "refusal_ms_p95": ms(percentile(refused, 0.95)),
        "refusal_ms_max": ms(max(refused)) if refused else None,
        "retry_after_share": round(with_header / n, 3),
        "retry_after_values": sorted({h for _, _, h in answers if h is not None}),
        "recovered_s": recovered_s,
    }


# --- phase 3: faults --------------------------------------------------------------------------


def kill_serve_replica(deployment: str) -> str:
    """ray.kill, with no restart, the one replica of `deployment` of this app (Serve starts
    another in its place); its actor name, e.g. 'SERVE_REPLICA::soak#base#x1y2z3'."""
    import ray

    named = ray.util.list_named_actors(all_namespaces=True)
    matches = [a for a in named if f"{APP_NAME}#{deployment}#" in a["name"]]
    if len(matches) != 1:
        raise RuntimeError(
            f"expected one replica of {deployment!r}, found {len(matches)} among "
            f"{sorted(a['name'] for a in named)}"
        )
    [replica] = matches
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    return replica["name"]


def crash_turn_log_actor(turn_log_path: str) -> str:
    """ray.kill the turn-log actor as a crash (Ray starts it again); its name."""
    import ray

    from antiphon.deploy.app import turn_log_actor_name_for

    name = turn_log_actor_name_for(turn_log_path)
    ray.kill(ray.get_actor(name, namespace="antiphon"), no_restart=False)
    return name


class HealthWatch:
    """Polls GET /health every `every_s` in a thread while its block runs."""

    def __init__(self, url: str, every_s: float = HEALTH_EVERY_S) -> None:
        self.url, self.every_s = f"{url}/health", every_s
        self.answers: list[tuple[float, int | None, dict | str]] = []  # (time, status, body)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(self.url)
                    self.answers.append((time.monotonic(), r.status_code, r.json()))
                except (httpx.HTTPError, ValueError) as e:
                    self.answers.append((time.monotonic(), None, f"{type(e).__name__}: {e}"))
                self._stop.wait(self.every_s)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def said(self, since: float) -> list[dict]:
        """Each change of answer, with seconds since `since` (the kill) and how many polls
        gave it in a row."""
        changes: list[dict] = []
        for t, status, body in self.answers:
            if changes and changes[-1]["status"] == status and changes[-1]["body"] == body:
                changes[-1]["polls"] += 1
                continue
            changes.append(
                {"at_s": round(t - since, 2), "status": status, "body": body, "polls": 1}
            )
        return changes


def logged_segments(turn_log_path: str) -> dict[str, list[int]]:
    """Per request id, the segment index of each TurnRecord in the log (a repeat: a record
    written twice)."""
    from antiphon.coordinator.records import TurnRecord
    from antiphon.training.turn_log import read_records

    found: dict[str, list[int]] = {}
    if Path(turn_log_path).exists():
        for record, _ in read_records(turn_log_path):
            if isinstance(record, TurnRecord):
                found.setdefault(record.request_id, []).append(record.segment)
    return found


# up to 96 tokens two at a time: ~45 turns, so a stream is well under way at the kill
FAULT_PARAMS = {"max_tokens": 96, "policy_params": {"segment_len": 2}}


def run_fault(
    url: str, n_streams: int, kill: Callable[[], str], turn_log_path: str, fault_prompt: str
) -> dict:
    """Start `n_streams` streams of `fault_prompt`, kill once every one has 2 events (or
    ended), then: streams lost, longest stall, turns lost, what /health said, and when a
    request succeeds again."""
    streams: list[Stream | None] = [None] * n_streams
    under_way = threading.Semaphore(0)

    def one(i: int) -> None:
        def on_event(stream: Stream) -> bool:
            streams[i] = stream
            if len(stream.events) == 2:
                under_way.release()
            return False

        with httpx.Client(timeout=600) as client:
            body = {"prompt": fault_prompt, "stream": True, **FAULT_PARAMS}
            streams[i] = stream_generate(client, url, body, on_event)
        if len(streams[i].events) < 2:
            under_way.release()  # it ended (or failed) first: do not wait for it forever

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_streams)]
    with HealthWatch(url) as health:  # from before the streams: what it said before the kill
        for t in threads:
            t.start()
        for _ in range(n_streams):
            under_way.acquire(timeout=300)
        in_flight = sum(1 for s in streams if s is not None and s.ended is None)
        killed_at = time.monotonic()
        killed = kill()
        for t in threads:
            t.join(timeout=600)
        streams_ended_s = time.monotonic() - killed_at
        recovered_s = wait_until_serving(url)
        time.sleep(1.0)  # a last poll or two after the recovery

    results = [s for s in streams if s is not None]
    lost = [s for s in results if not s.ok]
    ids = {s.request_id for s in results if s.request_id}
    deadline = time.monotonic() + TURN_LOG_WAIT_S
    while True:  # the last records land after the answers
        segments = logged_segments(turn_log_path)
        if ids <= set(segments) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # Finer than a request without turns: segments a client got that no record logs (the
    # turns of a coordinator that died before its batch went out), and records written twice.
    unlogged = sum(
        len(set(s.segment_indexes) - set(segments.get(s.request_id, ()))) for s in results
    )
    repeated = sum(len(v) - len(set(v)) for k, v in segments.items() if k in ids)
    said = health.said(killed_at)
    degraded = [
        c for c in said if isinstance(c["body"], dict) and c["body"].get("status") == "degraded"
    ]
    return {
        "killed": killed,
        "streams": n_streams,
        "in_flight_at_kill": in_flight,
        "streams_lost": len(lost) + (n_streams - len(results)),
        "lost_why": [s.why_not_ok() for s in lost],
        "streams_ended": summary(results),
        "longest_stall_s": round(max((s.longest_gap for s in results), default=0.0), 2),
        "streams_ended_s": round(streams_ended_s, 2),
        "stream_ids": len(ids),
        "turns_lost": len(ids - set(segments)),
        "segments_unlogged": unlogged,
        "turn_records_repeated": repeated,
        "health_said_degraded": bool(degraded),
        "health_degraded_first": degraded[0]["body"]["degraded"] if degraded else None,
        "health_polls": len(health.answers),
        "health_said": said,
        "recovered_s": recovered_s,
    }


# --- the run ----------------------------------------------------------------------------------


def run_phase(name: str, fn: Callable[[], dict]) -> dict:
    """Run one phase; a phase that raises is reported (and fails its targets), and the next
    phase still runs."""
    print(f"[soak] {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        result = fn()
    except Exception as e:
        traceback.print_exc()
        result = {"failed": f"{type(e).__name__}: {e}"}
    result["phase_s"] = round(time.monotonic() - started, 1)
    print(f"[soak] {name} done in {result['phase_s']} s", file=sys.stderr, flush=True)
    return result


def table_rows(result: dict) -> list[dict]:
    """One row per figure: phase, figure, value, target (None: reported only), holds."""
    rows: list[dict] = []

    def row(phase: str, figure: str, value, target: str | None = None, holds: bool | None = None):
        rows.append({"phase": phase, "figure": figure, "value": value, "target": target,
                     "holds": holds})  # fmt: skip

    not_run = {"failed": result.get("failed", "not run")}
    load = result.get("load", not_run)
    if "failed" in load:
        row("load", "phase", load["failed"], "runs", False)
    else:
        row("load", "requests completed", load["requests"])
        row("load", "errors", load["errors"], "0", load["errors"] == 0)
        row("load", "requests/s", load["requests_per_s"])
        row("load", "stream latency p50 (ms)", load["latency_ms_p50"])
        row("load", "stream latency p95 (ms)", load["latency_ms_p95"])
        row("load", "memory before (MiB)", load["memory_mib_before"])
        row("load", "memory after (MiB)", load["memory_mib_after"])
        ratio = load["memory_ratio"]
        row("load", "memory after/before", ratio, f"<= {MEMORY_TARGET}", ratio <= MEMORY_TARGET)

    refusal = result.get("refusal", not_run)
    if "failed" in refusal:
        row("refusal", "phase", refusal["failed"], "runs", False)
    else:
        n = refusal["requests"]
        row("refusal", "slots held throughout", f"{refusal['holders_held_throughout']}/"
            f"{refusal['slots']}", f"{refusal['slots']}/{refusal['slots']}",
            refusal["holders_held_throughout"] == refusal["slots"])  # fmt: skip
        row("refusal", "answered 503", f"{refusal['refused_503']}/{n}", f"{n}/{n}",
            refusal["refused_503"] == n)  # fmt: skip
        row("refusal", "refusal median (ms)", refusal["refusal_ms_median"])
        row("refusal", "refusal p95 (ms)", refusal["refusal_ms_p95"])
        worst = refusal["refusal_ms_max"]
        row("refusal", "refusal max (ms)", worst, f"<= {REFUSAL_TARGET_MS:g}",
            worst is not None and worst <= REFUSAL_TARGET_MS)  # fmt: skip
        share = refusal["retry_after_share"]
        row("refusal", "share with Retry-After", share, "1.0", share == 1.0)

    for name, fault in (result.get("faults") or {"faults": not_run}).items():
        phase = f"fault: {name}"
        if "failed" in fault:
            row(phase, "phase", fault["failed"], "runs", False)
            continue
        row(phase, "streams in flight at the kill", f"{fault['in_flight_at_kill']}/"
            f"{fault['streams']}")  # fmt: skip
        row(phase, "streams lost", fault["streams_lost"], "0", fault["streams_lost"] == 0)
        row(phase, "longest stall (s)", fault["longest_stall_s"])
        row(phase, "turns lost", fault["turns_lost"], "0", fault["turns_lost"] == 0)
        row(phase, "segments streamed, not logged", fault["segments_unlogged"])
        row(phase, "turn records written twice", fault["turn_records_repeated"])
        said = fault["health_degraded_first"]
        row(phase, "/health said degraded",
            f"yes: {json.dumps(said)}" if said is not None else "no")  # fmt: skip
        row(phase, "serving again after (s)", fault["recovered_s"], "recovers",
            fault["recovered_s"] is not None)  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    """A markdown table; figures without a target are reported only."""
    cells = [
        (r["phase"], r["figure"], str(r["value"]), r["target"] or "",
         "" if r["holds"] is None else ("yes" if r["holds"] else "NO"))
        for r in rows
    ]  # fmt: skip
    head = ("phase", "figure", "value", "target", "holds")
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    for line in [head, tuple("-" * w for w in widths), *cells]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64, help="concurrent load streams (= slots)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--fault-streams", type=int, default=8, help="streams in flight per fault")
    args = parser.parse_args()

    import ray
    from ray import serve

    from antiphon.cli import free_port
    from antiphon.deploy.app import build_app
    from antiphon.deploy.default import default_config, zoo_available

    work = Path(tempfile.mkdtemp(prefix="antiphon-soak-"))
    # The path the app builder resolves it to: the turn-log actor is named after it.
    turn_log_path = str((work / "turns.atl").expanduser().resolve())
    port = free_port()
    config = default_config()
    serving = config.serving.model_copy(
        update={
            "host": "127.0.0.1",
            "port": port,
            "turn_log_path": turn_log_path,
            "max_concurrent_requests": args.streams,
        }  # fmt: skip
    )
    config = config.model_copy(update={"serving": serving})
    url = f"http://127.0.0.1:{port}"
    result: dict = {
        "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
        "zoo": zoo_available(),
        "models": [m.name for m in config.models],
        "ensemble": {
            "models": list(config.ensembles[0].models),
            "policy": config.ensembles[0].policy.model_dump(),
        },  # fmt: skip
        "max_concurrent_requests": args.streams,
        "cpus": os.cpu_count(),
    }
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:  # whatever fails, the table and the JSON still say how far it got
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy_started = time.monotonic()
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        result["deploy_s"] = round(time.monotonic() - deploy_started, 1)
        result["replica_actors"] = sorted(
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if f"{APP_NAME}#" in a["name"]
        )  # fmt: skip
        result["load"] = run_phase(
            "load", lambda: run_load(url, args.streams, args.seconds, session_dir)
        )
        result["refusal"] = run_phase("refusal", lambda: run_refusal(url, args.streams))
        faults = {
            "model replica (base)": lambda: kill_serve_replica("base"),
            "coordinator replica": lambda: kill_serve_replica("coordinator"),
            "turn-log actor": lambda: crash_turn_log_actor(turn_log_path),
        }
        fault_prompt, tokens, _ = longest_answer(
            url, long_candidates(), FAULT_PARAMS, min(8, args.streams)
        )
        result["fault_prompt"] = {"prompt": fault_prompt, "tokens": tokens}
        result["faults"] = {}
        for name, kill in faults.items():
            result["faults"][name] = run_phase(
                f"fault: {name}",
                lambda kill=kill: run_fault(
                    url, args.fault_streams, kill, turn_log_path, fault_prompt
                ),
            )
    except Exception as e:
        traceback.print_exc()
        result["failed"] = f"{type(e).__name__}: {e}"
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = table_rows(result)
    result["table"] = rows
    result["all_targets_hold"] = all(r["holds"] for r in rows if r["holds"] is not None)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    print(f"\nall targets hold: {result['all_targets_hold']}  (details: {RESULTS})")
    sys.exit(0 if result["all_targets_hold"] else 1)


if __name__ == "__main__":
    main()
