"""antiphon's Prometheus metrics: each one's name, kind, description and tag keys in one
table (`METRICS`), and `record`, which the serving processes call where the values are known.

    from antiphon import metrics
    metrics.record(metrics.REQUESTS, 1, endpoint="/v1/generate", ensemble="default")

They are Ray metrics (`ray.serve.metrics`, i.e. `ray.util.metrics` that also carry the
Serve `application`, `deployment` and `replica` tags when made in a replica). Ray's metrics
agent on each node serves them in the Prometheus text format on the node's metrics export
port (`ray.nodes()[i]["MetricsExportPort"]`; fixed with `ray start --metrics-export-port`),
named with Ray's `ray_` prefix: a counter as `ray_NAME_total`, a histogram as
`ray_NAME_bucket` / `_sum` / `_count`, a gauge as `ray_NAME`. A process sends its points to
the agent every `RAY_metrics_report_interval_ms` (10 s by default).

Who records what: the HTTP ingress (`antiphon.deploy.http_metrics`) the requests, errors,
latencies and times to first segment; the coordinator (`antiphon.coordinator.metering`) the
turns, the tokens and segments by writer and kind, and the policies' decision latencies;
each model replica (`antiphon.actors.server`) its engine's tokens, sessions and cached tokens;
an online trainer (`antiphon.training.online_trainer`) its progress and its candidates.

Recording never raises: metrics must not fail a request. A metric that cannot be made is
logged and skipped from then on; a point that cannot be recorded is dropped (logged the first
time).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from ray.serve import metrics as serve_metrics
from ray.util.metrics import Metric

from antiphon.logging import get_logger

log = get_logger(__name__)

MetricKind = Literal["counter", "histogram", "gauge"]
EXPORT_PREFIX = "ray_"  # Ray's metrics agent puts it before every application metric


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: what Ray is told when it is made, and what it records."""

    name: str  # antiphon_...; Prometheus sees it with EXPORT_PREFIX and its kind's suffixes
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()  # a histogram's bucket upper bounds

    @property
    def series(self) -> tuple[str, ...]:
        """The names its points have on a Prometheus scrape."""
        base = EXPORT_PREFIX + self.name
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


# Seconds: from a fast rule-policy answer on a tiny model to a long search on a big one.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds: a rule policy decides in microseconds, a hosted or learned one in milliseconds.
DECISION_BUCKETS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TURN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# --- the HTTP ingress -------------------------------------------------------------------------
REQUESTS = MetricSpec(
    "antiphon_requests",
    "counter",
    "HTTP requests answered, by route template and ensemble ('-' where none was named or "
    "the name was unknown).",
    ("endpoint", "ensemble"),
)
REQUEST_ERRORS = MetricSpec(
    "antiphon_request_errors",
    "counter",
    "HTTP requests answered with an error (a 4xx/5xx, or an error event in a stream), by "
    "route template, error kind (the antiphon error class, InternalError, or HTTPnnn for the "
    "framework's own) and HTTP status.",
    ("endpoint", "error", "status"),
)
REQUEST_LATENCY = MetricSpec(
    "antiphon_request_latency_seconds",
    "histogram",
    "Seconds from a request's arrival at the ingress to the last byte of its answer (a "
    "stream's too), by route template and ensemble.",
    ("endpoint", "ensemble"),
    LATENCY_BUCKETS_S,
)
TIME_TO_FIRST_SEGMENT = MetricSpec(
    "antiphon_time_to_first_segment_seconds",
    "histogram",
    "Seconds from a streamed request's arrival at the ingress to its first segment, by "
    "route template and ensemble.",
    ("endpoint", "ensemble"),
    LATENCY_BUCKETS_S,
)
# --- the coordinator --------------------------------------------------------------------------
TURNS_PER_REQUEST = MetricSpec(
    "antiphon_turns_per_request",
    "histogram",
    "Policy decisions a request took (failed requests too), by policy.",
    ("policy",),
    TURN_BUCKETS,
)
RESPONSE_TOKENS = MetricSpec(
    "antiphon_response_tokens",
    "counter",
    "Tokens committed to responses, each in its writer's tokenizer, by writer (model) and "
    "segment kind (write, deferred, search): deferred over all is the deferral rate.",
    ("model", "kind"),
)
RESPONSE_SEGMENTS = MetricSpec(
    "antiphon_response_segments",
    "counter",
    "Segments committed to responses, by writer (model) and segment kind (write, deferred, "
    "search).",
    ("model", "kind"),
)
POLICY_DECISION_LATENCY = MetricSpec(
    "antiphon_policy_decision_seconds",
    "histogram",
    "Seconds the coordinator waited for a policy's decision (a hosted policy's round trip "
    "included), by policy.",
    ("policy",),
    DECISION_BUCKETS_S,
)
# --- each model replica -----------------------------------------------------------------------
TOKENS_GENERATED = MetricSpec(
    "antiphon_tokens_generated",
    "counter",
    "Tokens the replica's engine wrote by generate (drafts a search dropped included), by model.",
    ("model",),
)
LIVE_SESSIONS = MetricSpec(
    "antiphon_live_sessions", "gauge", "Sessions held by the replica, by model.", ("model",)
)
CACHED_TOKENS = MetricSpec(
    "antiphon_cached_tokens",
    "gauge",
    "Tokens held in the replica's KV caches, by model.",
    ("model",),
)

# --- the online trainers ----------------------------------------------------------------------
TRAINER_LOG_OFFSET = MetricSpec(
    "antiphon_trainer_log_offset",
    "gauge",
    "How far into the turn log the trainer has durably read (bytes), by trainer.",
    ("trainer",),
)
TRAINER_EXAMPLES = MetricSpec(
    "antiphon_trainer_examples",
    "counter",
    "Training examples the trainer made from rewarded requests, by trainer.",
    ("trainer",),
)
TRAINER_CANDIDATES = MetricSpec(
    "antiphon_trainer_candidates",
    "counter",
    "Candidates the promotion gate judged, by trainer and outcome (promoted, refused).",
    ("trainer", "outcome"),
)
SERVED_POLICY_STEP = MetricSpec(
    "antiphon_served_policy_step",
    "gauge",
    "The training step of the version served, by trainer (0: the initial one).",
    ("trainer",),
)

METRICS: tuple[MetricSpec, ...] = (
    REQUESTS,
    REQUEST_ERRORS,
    REQUEST_LATENCY,
    TIME_TO_FIRST_SEGMENT,
    TURNS_PER_REQUEST,
    RESPONSE_TOKENS,
    RESPONSE_SEGMENTS,
    POLICY_DECISION_LATENCY,
    TOKENS_GENERATED,
    LIVE_SESSIONS,
    CACHED_TOKENS,
    TRAINER_LOG_OFFSET,
    TRAINER_EXAMPLES,
    TRAINER_CANDIDATES,
    SERVED_POLICY_STEP,
)

# One Ray metric per spec and process, made on first use: made in a Serve replica (not at
# import, which may happen before the replica's context is set), it carries the replica's tags.
_made: dict[str, Metric | None] = {}  # None: making it failed; not tried again
_making = threading.Lock()  # the model replica records from its health check's thread too


def _metric(spec: MetricSpec) -> Metric | None:
    with _making:
        if spec.name not in _made:
            try:
                if spec.kind == "counter":
                    made = serve_metrics.Counter(spec.name, spec.description, spec.tag_keys)
                elif spec.kind == "gauge":
                    made = serve_metrics.Gauge(spec.name, spec.description, spec.tag_keys)
                else:
                    made = serve_metrics.Histogram(
                        spec.name, spec.description, list(spec.boundaries), spec.tag_keys
                    )
            except Exception as e:
                log.warning("metric_unavailable", metric=spec.name, error=repr(e))
                made = None
            _made[spec.name] = made
        return _made[spec.name]


_failed: set[str] = set()  # metrics whose recording failed once (logged then, not again)


def record(spec: MetricSpec, value: float, **tags: str) -> None:
    """Add `value` to a counter (nothing for 0), observe it in a histogram, or set a gauge to
    it; `tags` give every key of `spec.tag_keys`. Never raises."""
    if spec.kind == "counter" and value == 0:
        return  # Ray refuses to add 0
    metric = _metric(spec)
    if metric is None:
        return
    try:
        if spec.kind == "counter":
            metric.inc(value, tags)
        elif spec.kind == "histogram":
            metric.observe(value, tags)
        else:
            metric.set(value, tags)
    except Exception as e:
        if spec.name not in _failed:
            _failed.add(spec.name)
            log.warning("metric_record_failed", metric=spec.name, error=repr(e))
