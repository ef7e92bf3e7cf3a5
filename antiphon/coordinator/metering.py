"""The coordinator's metrics, recorded around the plain turn loop (which has no Ray in it) by
the deployment that hosts it: from each request's records, and around each policy decision.

- `MeteredTurnSink` wraps the turn sink the loop sends each finished request's records to:
  it records `antiphon_turns_per_request` (by policy) and `antiphon_response_tokens` /
  `antiphon_response_segments` (by writer and segment kind: deferred over all is the
  deferral rate), then hands the batch on to the sink it wraps, if any, each request record
  stamped with the replica that ran it (several replicas write one turn log).
- `timed_policies` wraps a policy resolver: every policy it resolves records
  `antiphon_policy_decision_seconds` (by policy) for each decision, turns that commit no
  segment included (a search step, a Finish), which the records do not show.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

from antiphon import metrics
from antiphon.coordinator.records import FeedbackRecord, Record, RequestRecord, TurnRecord, TurnSink
from antiphon.errors import InvalidRequest
from antiphon.policies.base import Decision, Policy
from antiphon.policies.registry import PolicyResolver
from antiphon.sequence import SequenceView


class MeteredTurnSink:
    """A `TurnSink` that records the metrics of each batch of records it is sent, then sends
    the batch on to `inner` (None: the records go nowhere else)."""

    def __init__(self, inner: TurnSink | None, coordinator: str = "") -> None:
        self.inner = inner
        self.coordinator = coordinator  # the replica's id, stamped on its request records

    async def write(self, records: list[Record]) -> None:
        record_request_metrics(records)  # never raises: the inner sink still gets the batch
        if self.inner is not None:
            if self.coordinator:  # several replicas write one log: each names itself
                records = [replace(r, coordinator=self.coordinator)
                           if isinstance(r, RequestRecord) else r for r in records]  # fmt: skip
            await self.inner.write(records)

    async def feedback(self, record: FeedbackRecord) -> None:
        if self.inner is None:
            raise InvalidRequest("this deployment has no turn log to record feedback in")
        await self.inner.feedback(record)

    async def flush(self) -> None:
        if self.inner is not None:
            await self.inner.flush()

    async def problem(self) -> str | None:
        return None if self.inner is None else await self.inner.problem()


def record_request_metrics(records: list[Record]) -> None:
    """The metrics of one request's records (its turn records, then its request record)."""
    for record in records:
        if isinstance(record, TurnRecord):
            tags = {"model": record.model, "kind": record.segment_kind}
            metrics.record(metrics.RESPONSE_SEGMENTS, 1, **tags)
            metrics.record(metrics.RESPONSE_TOKENS, len(record.token_ids), **tags)
        elif isinstance(record, RequestRecord):
            metrics.record(metrics.TURNS_PER_REQUEST, record.num_turns, policy=record.policy)


class TimedPolicy:
    """A policy whose decisions are timed into `antiphon_policy_decision_seconds`; otherwise
    the policy it wraps (its name, its version now)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name

    @property
    def version(self) -> str:
        return self.policy.version  # a hosted policy's version moves as its actor learns

    async def decide(self, view: SequenceView) -> Decision:
        started = time.perf_counter()
        decision = await self.policy.decide(view)
        elapsed = time.perf_counter() - started
        metrics.record(metrics.POLICY_DECISION_LATENCY, elapsed, policy=self.name)
        return decision


def timed_policies(resolve: PolicyResolver) -> PolicyResolver:
    """`resolve`, its policies timed."""

    def resolve_timed(name: str, params: Mapping[str, object], ensemble: tuple[str, ...]) -> Policy:
        return TimedPolicy(resolve(name, params, ensemble))

    return resolve_timed
