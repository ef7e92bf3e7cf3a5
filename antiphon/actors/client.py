"""`ServeModelClient`: the SessionModel interface over a model deployment's handle.

The coordinator talks to an in-process `ModelEngine` and to a deployment through the same
methods. Session calls carry their session id as Serve's routing key, so the deployment's
`SessionAffinityRouter` sends them to the replica holding the cache.

Errors come back as the engine raised them: an antiphon error raised on a replica reaches
the caller as that same class with its message (not Ray's wrapper), and a session call whose
replica died in flight raises `SessionLost`.
"""

from __future__ import annotations

from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from antiphon.errors import InvalidRequest, SessionLost, unwrapped
from antiphon.messages import Generation, ModelInfo, SamplingParams, SessionInfo, TeacherForced


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

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    def _session_handle(self, session_id: str) -> DeploymentHandle:
        if not isinstance(session_id, str):
            # Checked here: the routing key must be a string before Serve sees it.
            raise InvalidRequest(f"session_id must be a string, got {type(session_id).__name__}")
        return self.handle.options(session_id=session_id)

    async def info(self) -> ModelInfo:
        return await _result(self.handle.info.remote())

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        return await _result(self.handle.open.remote(prompt))

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        h = self._session_handle(session_id)
        return await _result(h.append.remote(session_id, token_ids), session_id)

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        if session_id is None:  # opens a session: any replica will do
            return await _result(self.handle.generate.remote(None, params, list(prefix_ids)))
        h = self._session_handle(session_id)
        return await _result(h.generate.remote(session_id, params, list(prefix_ids)), session_id)

    async def score(self, session_id: str, token_ids: list[int], keep: bool = False) -> list[float]:
        h = self._session_handle(session_id)
        return await _result(h.score.remote(session_id, token_ids, keep), session_id)

    async def teacher_force(
        self, session_id: str, token_ids: list[int], top_k: int = 0
    ) -> TeacherForced:
        h = self._session_handle(session_id)
        return await _result(h.teacher_force.remote(session_id, token_ids, top_k), session_id)

    async def next_token_logprobs(self, session_id: str, candidate_ids: list[int]) -> list[float]:
        h = self._session_handle(session_id)
        return await _result(h.next_token_logprobs.remote(session_id, candidate_ids), session_id)

    async def prompt_next_token_logprobs(
        self, prompt: list[int] | str, candidate_ids: list[int]
    ) -> list[float]:
        return await _result(self.handle.prompt_next_token_logprobs.remote(prompt, candidate_ids))

    async def fork(self, session_id: str, n: int, length: int | None = None) -> list[str]:
        h = self._session_handle(session_id)
        return await _result(h.fork.remote(session_id, n, length), session_id)

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        h = self._session_handle(session_id)
        return await _result(h.truncate.remote(session_id, length), session_id)

    async def close(self, session_id: str) -> None:
        h = self._session_handle(session_id)
        try:
            await _result(h.close.remote(session_id), session_id)
        except SessionLost:
            pass  # closing a session whose replica is gone: nothing left to forget
