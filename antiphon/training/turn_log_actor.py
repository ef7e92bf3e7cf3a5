"""`TurnLogActor`: the single writer of the turn log, a Ray actor every coordinator replica
sends its record batches to; `TurnLogClient` is the coordinator's `TurnSink` over it.

    sink = TurnLogClient("runs/turns.atl")      # Coordinator(..., turn_sink=sink)
    actor = get_or_create_turn_log("runs/turns.atl")     # detached, named: one per cluster

A `TurnLogClient` is a small value: the app builder makes it and hands it to the coordinator
deployment, and it finds (or creates) its actor on first use, in the replica that uses it.

The actor runs one call at a time, so records from all replicas land whole and never
interleave within a batch; a coordinator sends one batch per request, after its last event.
"""

from __future__ import annotations

import asyncio

import ray
import structlog
from ray.actor import ActorHandle
from ray.exceptions import ActorDiedError

from antiphon.coordinator.records import FeedbackRecord, Record
from antiphon.errors import unwrapped
from antiphon.training.turn_log import DEFAULT_SEGMENT_BYTES, TurnLogWriter

log = structlog.get_logger(__name__)

DEFAULT_ACTOR_NAME = "antiphon-turn-log"


class TurnLogActor:
    """Appends record batches and feedback to one `TurnLogWriter` (see turn_log.py)."""

    def __init__(
        self, path: str, fsync_every_s: float = 1.0, segment_bytes: int = DEFAULT_SEGMENT_BYTES
    ) -> None:
        self.writer = TurnLogWriter(path, fsync_every_s=fsync_every_s, segment_bytes=segment_bytes)

    def append(self, records: list[Record]) -> int:
        """Append a batch; return the (absolute) log offset after it."""
        return self.writer.append(records)

    def feedback(self, record: FeedbackRecord) -> int:
        """Log a client's reward for a request beside its turns (NotFound for a request the
        log does not hold)."""
        return self.writer.append_feedback(record)

    def sync(self) -> int:
        """fsync now; return the offset everything before which is on disk."""
        self.writer.sync()
        return self.writer.offset

    def path(self) -> str:
        return str(self.writer.path)

    def close(self) -> None:
        """fsync and close the log (call before killing the actor to keep the last second)."""
        self.writer.close()


def get_or_create_turn_log(
    path: str,
    name: str = DEFAULT_ACTOR_NAME,
    namespace: str | None = "antiphon",
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> ActorHandle:
    """The cluster's turn log actor `name`, created (detached, no CPU reserved) if missing.

    If its process dies, Ray starts it again (it reopens the log, cutting a torn last frame)
    and retries the calls that were in flight or sent meanwhile, so a crash loses no batch.
    That is at-least-once: a batch the dead actor had written but not yet answered for is
    written again after it."""
    remote_cls = ray.remote(TurnLogActor)
    return remote_cls.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_concurrency=1,
        max_restarts=-1,
        max_task_retries=-1,
    ).remote(path, segment_bytes=segment_bytes)


class TurnLogClient:
    """A `TurnSink` over the turn log actor of one file: `write` sends the batch and returns
    without waiting for the disk; `flush` waits for everything sent so far."""

    def __init__(
        self,
        path: str,
        name: str = DEFAULT_ACTOR_NAME,
        namespace: str | None = "antiphon",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.path = path
        self.name = name
        self.namespace = namespace
        self.segment_bytes = segment_bytes  # for the actor it starts, if none runs yet
        self._actor: ActorHandle | None = None  # found on first use
        self._in_flight: set[asyncio.Future] = set()

    def __getstate__(self) -> dict:
        return {"path": self.path, "name": self.name, "namespace": self.namespace,
                "segment_bytes": self.segment_bytes}  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def actor(self) -> ActorHandle:
        if self._actor is None:
            self._actor = get_or_create_turn_log(
                self.path, self.name, self.namespace, self.segment_bytes
            )
        return self._actor

    async def write(self, records: list[Record]) -> None:
        task = asyncio.ensure_future(self._append(records))
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    async def _append(self, records: list[Record]) -> int:
        try:
            return await self.actor.append.remote(records)
        except ActorDiedError:
            # Dead for good (a crash is restarted by Ray, its calls retried): a new actor
            # takes the file over, and the batch goes to it.
            log.warning("turn_log_actor_replaced", name=self.name, path=self.path)
            self._actor = None
            return await self.actor.append.remote(records)

    async def feedback(self, record: FeedbackRecord) -> None:
        await self.flush()  # this replica's batches first: they may hold the request's records
        try:
            await unwrapped(self.actor.feedback.remote(record))
        except ActorDiedError:  # dead for good, as in `_append`
            self._actor = None
            await unwrapped(self.actor.feedback.remote(record))

    async def problem(self, timeout_s: float = 2.0) -> str | None:
        """None if the actor answers within `timeout_s`; else what is wrong (a dead one is
        replaced by the next write)."""
        try:
            await asyncio.wait_for(self.actor.path.remote(), timeout_s)
        except ActorDiedError:
            self._actor = None
            return "the turn log actor died; the next request's records start a new one"
        except TimeoutError:
            return f"the turn log actor did not answer within {timeout_s:g} s"
        return None

    def _done(self, fut: asyncio.Future) -> None:
        self._in_flight.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("turn_log_append_failed", error=repr(fut.exception()))

    async def flush(self) -> None:
        """Wait for every batch sent so far; raise the first failure among them."""
        results = await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
