"""The metrics an operator scrapes: requests (plain, streamed, refused, failed) through the real
HTTP server, then the node's Prometheus endpoint (Ray's metrics agent) read over HTTP until
every antiphon metric shows them."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import defaultdict

import httpx
import pytest
import ray

from antiphon import metrics
from antiphon.client import sse_events
from tests.deploy.server import APP_NAME, RunningServer

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
GENERATE = "/v1/generate"
SCRAPE_WITHIN_S = 60  # a process sends its points every 10 s (RAY_metrics_report_interval_ms)

Labels = frozenset[tuple[str, str]]
Scrape = dict[str, dict[Labels, float]]  # series name -> labels -> value

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> Scrape:
    """The samples of a Prometheus text-format page."""
    samples: Scrape = defaultdict(dict)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        samples[name][frozenset(_LABEL.findall(labels or ""))] = float(value)
    return samples


def scrape() -> Scrape:
    """Every node's metrics export port (one node here), read as Prometheus would."""
    samples: Scrape = defaultdict(dict)
    for node in ray.nodes():
        if node["Alive"]:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as page:
                for name, series in parse_prometheus(page.read().decode()).items():
                    samples[name].update(series)
    return samples


def value(samples: Scrape, series: str, **labels: str) -> float:
    """The sum over the test app's series of `series` whose labels include `labels` (0 if
    none: not exported yet)."""
    wanted = {("application", APP_NAME), *labels.items()}
    return sum(v for ls, v in samples.get(series, {}).items() if wanted <= ls)


def has(samples: Scrape, series: str, **labels: str) -> bool:
    """Whether the test app exports a series of `series` with `labels`."""
    wanted = {("application", APP_NAME), *labels.items()}
    return any(wanted <= ls for ls in samples.get(series, {}))


def buckets(samples: Scrape, histogram: metrics.MetricSpec, **labels: str) -> list[float]:
    """A histogram's cumulative bucket counts, in bucket order (+Inf last)."""
    bounds = [*(float(b) for b in histogram.boundaries), float("inf")]
    series = histogram.series[0]
    by_bound = {
        b: sum(
            v
            for ls, v in samples.get(series, {}).items()
            if {("application", APP_NAME), *labels.items()} <= ls and float(dict(ls)["le"]) == b
        )  # fmt: skip
        for b in bounds
    }
    return [by_bound[b] for b in bounds]


def post(server: RunningServer, body: dict, **kw) -> httpx.Response:
    headers = kw.pop("headers", server.headers)
    return httpx.post(f"{server.url}{GENERATE}", json=body, headers=headers, timeout=120, **kw)


def streamed_segments(server: RunningServer, body: dict) -> list[dict]:
    """The segments of a streamed answer, from its `done` event."""
    body = {**body, "stream": True}
    with httpx.stream("POST", f"{server.url}{GENERATE}", json=body, headers=server.headers,
                      timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        events = list(sse_events(response.iter_lines()))
    [done] = [json.loads(data) for event, data in events if event == "done"]
    return done["segments"]


def test_requests_show_in_every_metric_on_the_prometheus_endpoint(server):
    pair = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 8}
    answers = [post(server, pair).json()["segments"], streamed_segments(server, pair)]
    deferred = post(server, {"prompt": PROMPT, "ensemble": "deferred", "max_tokens": 8})
    answers.append(deferred.json()["segments"])
    unknown = post(server, {"prompt": PROMPT, "ensemble": "no-such-ensemble"})
    assert unknown.status_code == 404
    assert post(server, pair, headers={}).status_code == 401  # refused by the key check
    written: dict[tuple[str, str], list[int]] = defaultdict(list)  # (model, kind) -> sizes
    for segments in answers:
        for s in segments:
            written[s["model"], s["kind"]].append(s["num_tokens"])

    expected = [  # (what, series, labels, at least)
        ("requests", "requests_total", {"endpoint": GENERATE, "ensemble": "pair"}, 2),
        ("refused and unknown", "requests_total", {"endpoint": GENERATE, "ensemble": "-"}, 2),
        ("NotFound", "request_errors_total",
         {"endpoint": GENERATE, "error": "NotFound", "status": "404"}, 1),
        ("Unauthorized", "request_errors_total",
         {"endpoint": GENERATE, "error": "Unauthorized", "status": "401"}, 1),
        ("latency", "request_latency_seconds_count", {"endpoint": GENERATE, "ensemble": "pair"},
         2),
        ("first segment", "time_to_first_segment_seconds_count",
         {"endpoint": GENERATE, "ensemble": "pair"}, 1),
        ("turns", "turns_per_request_count", {"policy": "round_robin"}, 2),
        ("deferral turns", "turns_per_request_count", {"policy": "defer"}, 1),
        ("decisions", "policy_decision_seconds_count", {"policy": "round_robin"}, 2),
        ("engine tokens", "tokens_generated_total", {"model": "a"}, 1),
    ]  # fmt: skip
    for (model, kind), sizes in written.items():
        tags = {"model": model, "kind": kind}
        expected.append((f"tokens {model}/{kind}", "response_tokens_total", tags, sum(sizes)))
        expected.append((f"segments {model}/{kind}", "response_segments_total", tags, len(sizes)))
    gauges = ["live_sessions", "cached_tokens"]  # present for each model replica

    def missing_from(samples: Scrape) -> list[str]:
        """The expectations the scrape does not meet (yet)."""
        short = [what for what, series, labels, least in expected
                 if value(samples, f"ray_antiphon_{series}", **labels) < least]  # fmt: skip
        for gauge in gauges:
            for model in ("a", "b"):
                if not has(samples, f"ray_antiphon_{gauge}", model=model):
                    short.append(f"{gauge} {model}")
        return short

    deadline = time.monotonic() + SCRAPE_WITHIN_S
    while True:
        samples = scrape()
        missing = missing_from(samples)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not missing, f"not on the scrape within {SCRAPE_WITHIN_S} s: {missing}"

    # The histograms are whole: cumulative buckets ending in +Inf = count, and a sum.
    route = {"endpoint": GENERATE, "ensemble": "pair"}
    for spec, labels in [
        (metrics.REQUEST_LATENCY, route),
        (metrics.TIME_TO_FIRST_SEGMENT, route),
        (metrics.TURNS_PER_REQUEST, {"policy": "round_robin"}),
        (metrics.POLICY_DECISION_LATENCY, {"policy": "round_robin"}),
    ]:
        _, total, count = spec.series
        counts = buckets(samples, spec, **labels)
        assert counts == sorted(counts), (spec.name, counts)
        assert counts[-1] == value(samples, count, **labels) >= 1, (spec.name, counts)
        assert value(samples, total, **labels) > 0, spec.name
    # a stream's first segment comes before its last byte; each request takes a turn or more
    first, whole = metrics.TIME_TO_FIRST_SEGMENT.series[1], metrics.REQUEST_LATENCY.series[1]
    assert value(samples, first, **route) <= value(samples, whole, **route)
    _, turns, requests = metrics.TURNS_PER_REQUEST.series
    policy = {"policy": "round_robin"}
    assert value(samples, turns, **policy) >= value(samples, requests, **policy)
