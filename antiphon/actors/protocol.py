"""The session operations every model deployment offers, as one async interface.

The engine (`antiphon.actors.engine`, no Ray) and the Serve client over a deployment handle
both satisfy `SessionModel`, so the coordinator runs the same code in-process (tests, the
benchmarks' baseline) and across a cluster.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from antiphon.messages import Generation, ModelInfo, SamplingParams, SessionInfo


@runtime_checkable
class SessionModel(Protocol):
    """One checkpoint's sessions. Every method raises `SessionLost` for an unknown session id,
    `InvalidRequest` (or `PromptTooLong`) for bad input, `Overloaded` when full."""

    async def info(self) -> ModelInfo: ...

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        """Start a session from prompt ids or text; the model reads the prompt (prefill)."""
        ...

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        """Add tokens written elsewhere (another model, the user) to the session."""
        ...

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        """Append `prefix_ids` (tokens written elsewhere), then write up to
        params.max_new_tokens tokens and append them to the session: `append` + `generate` in
        one call and one forward pass. With session_id None, open a new session whose prompt
        is `prefix_ids` (Generation.session_id names it; the caller closes it)."""
        ...

    async def score(self, session_id: str, token_ids: list[int], keep: bool = False) -> list[float]:
        """log p(token_i | session + token_<i) for each token; the session is unchanged, or
        with `keep` the tokens are appended to it (scored and kept in one forward pass)."""
        ...

    async def fork(self, session_id: str, n: int, length: int | None = None) -> list[str]:
        """n new sessions that start as copies of this one (the prefix cache is shared), or of
        its first `length` tokens."""
        ...

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        """Cut the session back to its first `length` tokens (rollback)."""
        ...

    async def close(self, session_id: str) -> None:
        """Forget the session; closing an unknown session is not an error."""
        ...
