"""`ServeModelClient`: the SessionModel interface over a model deployment's handle.

The coordinator talks to an in-process `ModelEngine` and to a deployment through the same
methods. Session calls carry their session id as Serve's routing key, so the deployment's
`SessionAffinityRouter` sends them to the replica holding the cache.

After a session's first call, its calls go straight to its home replica over a kept
connection (`antiphon.actors.direct`), past Serve's router and request wrapper: the client
asks that replica for its address once, through Serve, and keeps one channel per replica. A
replica whose address cannot be reached is called through Serve as before. `direct=False`
sends every call through Serve (whose autoscaler then counts them all).

Errors come back as the engine raised them: an antiphon error raised on a replica reaches
the caller as that same class with its message (not Ray's wrapper), and a session call whose
replica died in flight raises `SessionLost`.
"""

from __future__ import annotations

import asyncio

from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from antiphon.actors.affinity import home_replica_of
from antiphon.actors.direct import ChannelLost, DirectChannel
from antiphon.errors import InvalidRequest, SessionLost, unwrapped
from antiphon.logging import get_logger
from antiphon.messages import Generation, ModelInfo, SamplingParams, SessionInfo, TeacherForced

log = get_logger(__name__)


async def _result(response: DeploymentResponse, session_id: str | None = None):
    """Await a deployment call; antiphon errors come back as themselves; a session call whose
    replica died loses its session."""
    try:
        return await unwrapped(response)
    except (RayTaskError, ActorDiedError) as e:
        died = isinstance(e, ActorDiedError) or isinstance(e.cause, ActorDiedError)
        if session_id is not None and died:
            raise _replica_died(session_id) from None
        raise


def _replica_died(session_id: str) -> SessionLost:
    return SessionLost(f"session {session_id!r}: its replica died during the call")


class ServeModelClient:
    """A `SessionModel` whose sessions live on the replicas of a Serve deployment."""

    def __init__(self, handle: DeploymentHandle, direct: bool = True) -> None:
        self.handle = handle
        self.direct = direct
        # per home replica: its channel, or None where it cannot be reached directly
        self._channels: dict[str, DirectChannel | None] = {}
        self._connecting: dict[str, asyncio.Future] = {}

    @staticmethod
    def _check_session_id(session_id: str) -> None:
        if not isinstance(session_id, str):
            # Checked here: the routing key must be a string before Serve sees it.
            raise InvalidRequest(f"session_id must be a string, got {type(session_id).__name__}")

    def _session_handle(self, session_id: str) -> DeploymentHandle:
        return self.handle.options(session_id=session_id)

    async def _session_call(self, method: str, session_id: str, *args):
        """`method(session_id, *args)` on the session's home replica: over its channel, else
        through Serve."""
        self._check_session_id(session_id)
        channel = await self._channel(session_id) if self.direct else None
        if channel is None:
            h = self._session_handle(session_id)  # built only here: off the direct path
            return await _result(getattr(h, method).remote(session_id, *args), session_id)
        try:
            return await channel.call(method, [session_id, *args])
        except ChannelLost:
            raise _replica_died(session_id) from None

    async def _channel(self, session_id: str) -> DirectChannel | None:
        replica = home_replica_of(session_id)
        if replica is None:
            return None  # not a session id a replica made: Serve's answer names the problem
        if replica in self._channels:
            channel = self._channels[replica]
            if channel is None or (not channel.closed and channel.loop is _loop()):
                return channel
        # one connect per replica at a time; calls arriving meanwhile wait for it
        pending = self._connecting.get(replica)
        if pending is None or pending.get_loop() is not _loop():
            pending = self._connecting[replica] = asyncio.ensure_future(
                self._connect(replica, self._session_handle(session_id))
            )
            pending.add_done_callback(lambda _: self._connecting.pop(replica, None))
        return await asyncio.shield(pending)

    async def _connect(self, replica: str, h: DeploymentHandle) -> DirectChannel | None:
        try:
            address = await _result(h.direct_address.remote())
        except Exception as e:  # a replica that cannot say (gone, or older code): use Serve
            log.warning("direct_address_failed", replica=replica, error=repr(e))
            return None  # not cached: a dead replica's sessions fail through Serve anyway
        if address.replica_id != replica:
            return None  # the home replica is gone and another answered: Serve says SessionLost
        try:
            channel = await DirectChannel.connect(address)
        except (OSError, TimeoutError) as e:
            log.warning("direct_channel_unreachable", replica=replica,
                        address=f"{address.host}:{address.port}", error=repr(e))  # fmt: skip
            channel = None
        self._channels[replica] = channel
        return channel

    async def info(self) -> ModelInfo:
        return await _result(self.handle.info.remote())

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        return await _result(self.handle.open.remote(prompt))

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        return await self._session_call("append", session_id, token_ids)

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        if session_id is None:  # opens a session: any replica will do
            return await _result(self.handle.generate.remote(None, params, list(prefix_ids)))
        return await self._session_call("generate", session_id, params, list(prefix_ids))

    async def score(self, session_id: str, token_ids: list[int], keep: bool = False) -> list[float]:
        return list(await self._session_call("score", session_id, token_ids, keep))

    async def teacher_force(
        self, session_id: str, token_ids: list[int], top_k: int = 0
    ) -> TeacherForced:
        return await self._session_call("teacher_force", session_id, token_ids, top_k)

    async def next_token_logprobs(self, session_id: str, candidate_ids: list[int]) -> list[float]:
        return list(await self._session_call("next_token_logprobs", session_id, candidate_ids))

    async def prompt_next_token_logprobs(
        self, prompt: list[int] | str, candidate_ids: list[int]
    ) -> list[float]:
        return await _result(self.handle.prompt_next_token_logprobs.remote(prompt, candidate_ids))

    async def fork(self, session_id: str, n: int, length: int | None = None) -> list[str]:
        return list(await self._session_call("fork", session_id, n, length))

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        return await self._session_call("truncate", session_id, length)

    async def close(self, session_id: str) -> None:
        try:
            await self._session_call("close", session_id)
        except SessionLost:
            pass  # closing a session whose replica is gone: nothing left to forget


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()
