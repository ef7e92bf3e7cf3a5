"""Session affinity: every call of a session reaches the replica that holds its KV cache.

How it works:
- A replica gives its engine the id prefix `f"{replica_unique_id}~"`, so every session id it
  hands out names its home replica (`session_id_prefix`, `home_replica_of`).
- The client sends each session call with `handle.options(session_id=...)`, which Ray Serve
  puts on the request's metadata.
- `SessionAffinityRouter`, the deployment's request router (it runs in the caller's process,
  one per handle), reads that id and ranks only the home replica. If the home replica is busy
  the request waits for it (with backoff); it is never sent to a replica without the cache.
- If the home replica is gone (the router no longer lists it, or a send to it fails with
  ActorDiedError and Serve drops it), the request goes to any live replica, whose engine
  does not know the session and raises `SessionLost` at once. Nothing waits for a dead
  replica, so the call fails fast and the caller reopens the session from its own state.

Calls without a session id (info, open) are spread over replicas by power of two choices.

Serve's base router hands the replica it chose to the pending request with the routed
request's internal id; calls made concurrently while serving one request (a search step's
generates) share that id, so it gave the replica to the wrong one and never finished the
rest: every later call of that handle waited. This router hands it to the routed request
itself (`_fulfill_next_pending_request`, the hook Serve's own routers override).
"""

from __future__ import annotations

import random

from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SESSION_ID_SEPARATOR = "~"  # not in Serve's replica ids (alphanumeric) nor in uuid hex


def session_id_prefix(replica_unique_id: str) -> str:
    """The prefix a replica's engine puts on its session ids."""
    if SESSION_ID_SEPARATOR in replica_unique_id:
        raise ValueError(f"replica id {replica_unique_id!r} contains {SESSION_ID_SEPARATOR!r}")
    return f"{replica_unique_id}{SESSION_ID_SEPARATOR}"


def home_replica_of(session_id: str) -> str | None:
    """The unique id of the replica that made this session, or None if the id names none."""
    replica_id, sep, rest = session_id.partition(SESSION_ID_SEPARATOR)
    if not sep or not replica_id or not rest:
        return None
    return replica_id


class SessionAffinityRouter(RequestRouter):
    """Ray Serve request router: session calls go to their home replica, others anywhere."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Back off between attempts instead of spinning while the chosen replica is full.
            pending_request.routing_context.should_backoff = True
            home = home_replica_of(pending_request.metadata.session_id or "")
            if home is not None:
                for replica in candidate_replicas:
                    if replica.replica_id.unique_id == home:
                        return [[replica]]
                # Home replica gone: any replica answers SessionLost for this session.
        # Power of two choices; shuffled because Serve breaks queue-length ties by order.
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: RequestMetadata | None = None
    ) -> None:
        """Give the chosen replica to the request that was routed (its metadata object is
        its own; its internal request id may be shared with concurrent calls)."""
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return
