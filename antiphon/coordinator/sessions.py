"""A request's model sessions: one per model, opened lazily, brought up to date ("synced")
with the sequence state just before its model writes or scores.

A write is one model call: `generate` carries the tokens the session lacks as its prefix (or,
for a model's first write, opens the session with the prompt and every segment so far):

- models whose tokenizer fingerprints match exchange token ids as written;
- otherwise the text of a run of foreign segments is re-tokenized as a whole with the
  receiving model's tokenizer (merges inside the run are right; a merge across the boundary
  with the receiver's own previous tokens is not made: the receiver sees the text as if it
  had stopped there, which is what it did).

A `SessionLost` (replica restarted, session evicted) reopens the session from the state
(prompt + every committed segment) and retries the call once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from antiphon.actors.protocol import SessionModel
from antiphon.errors import SessionLost
from antiphon.logging import get_logger
from antiphon.messages import Generation, ModelInfo, SamplingParams
from antiphon.sequence import Segment, SequenceState

log = get_logger(__name__)

PROMPT_CHARS_IN_LOOP = 16_384  # a longer prompt is tokenized in a worker thread


class ModelSession:
    """One model's session for one request, and how many of the state's segments it holds."""

    def __init__(self, sessions: RequestSessions, name: str) -> None:
        self.sessions = sessions
        self.name = name
        self.model: SessionModel = sessions.models[name]
        self.tokenizer = sessions.tokenizers[name]
        self.info: ModelInfo = sessions.infos[name]
        self.session_id: str | None = None
        self.synced = 0  # state.segments[:synced] are in the session

    def ids_for(self, segments: Sequence[Segment]) -> list[int]:
        """Token ids, in this model's tokenizer, of segments written by any model."""
        mine = self.info.tokenizer_fingerprint
        out: list[int] = []
        text_run: list[str] = []
        for seg in segments:
            if self.sessions.infos[seg.model].tokenizer_fingerprint == mine:
                if text_run:
                    out += self.encode("".join(text_run))
                    text_run = []
                out += seg.token_ids
            else:
                text_run.append(seg.text)
        if text_run:
            out += self.encode("".join(text_run))
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self) -> list[int]:
        """The request's prompt in this model's tokenizer (special tokens included)."""
        return self.sessions.prompt_ids(self.name)

    def context_room(self, state: SequenceState) -> int:
        """Tokens this model can still write: its context minus the sequence in its ids."""
        used = len(self.prompt_ids()) + len(self.ids_for(state.segments))
        return self.info.max_context - used

    async def open_detached(self, state: SequenceState, extra: Sequence[Segment] = ()) -> str:
        """A new session holding the state plus `extra` segments, not this object's own."""
        ids = self.prompt_ids() + self.ids_for(state.segments) + self.ids_for(extra)
        return (await self.model.open(ids)).session_id

    async def sync(self, state: SequenceState) -> None:
        """Open the session if needed, then append the committed segments it lacks."""
        if self.session_id is None:
            self.session_id = await self.open_detached(state)
        else:
            ids = self.ids_for(state.segments[self.synced :])
            if ids:
                await self.model.append(self.session_id, ids)
        self.synced = len(state.segments)

    async def generate(self, state: SequenceState, params: SamplingParams) -> Generation:
        """Sync and generate in one call; on SessionLost reopen from the state, retry once."""
        try:
            return await self._sync_and_generate(state, params)
        except SessionLost:
            log.warning("session_lost", model=self.name)  # request_id, turn: bound
            self.session_id = None
            return await self._sync_and_generate(state, params)

    async def _sync_and_generate(self, state: SequenceState, params: SamplingParams) -> Generation:
        """One model call: the committed segments the session lacks go as the generate call's
        prefix (no session yet: the prompt and all segments open one), so a turn costs one
        round trip and the catch-up rides in the same forward pass as the first new token."""
        if self.session_id is None:
            prefix = self.prompt_ids() + self.ids_for(state.segments)
        else:
            prefix = self.ids_for(state.segments[self.synced :])
        gen = await self.model.generate(self.session_id, params, prefix)
        self.session_id, self.synced = gen.session_id, len(state.segments)
        return gen

    async def truncate(self, length: int) -> None:
        """Cut the session back to its first `length` tokens (a dropped end token)."""
        if self.session_id is not None:
            await self.model.truncate(self.session_id, length)

    def adopt(self, session_id: str, synced: int) -> str | None:
        """Make another session of this model (a search beam's) this one; return the
        replaced session's id, for the caller to close."""
        old, self.session_id, self.synced = self.session_id, session_id, synced
        return old


class RequestSessions:
    """The model sessions of one request, and the sessions its executors opened beside them
    (search beams): `close_all` closes every one at the request's end."""

    def __init__(
        self,
        models: Mapping[str, SessionModel],
        tokenizers: Mapping[str, object],
        infos: Mapping[str, ModelInfo],
        prompt: str,
    ) -> None:
        self.models = models
        self.tokenizers = tokenizers
        self.infos = infos
        self.prompt = prompt
        self._own: dict[str, ModelSession] = {}
        self._prompt_ids: dict[str, list[int]] = {}  # model -> prompt in its tokenizer, once
        self.detached: set[tuple[str, str]] = set()  # (model, session id) opened by executors

    def __getitem__(self, name: str) -> ModelSession:
        if name not in self._own:
            self._own[name] = ModelSession(self, name)
        return self._own[name]

    def prompt_ids(self, name: str) -> list[int]:
        """The prompt in model `name`'s tokenizer (special tokens included), a fresh list."""
        if name not in self._prompt_ids:
            self._prompt_ids[name] = list(self.tokenizers[name](self.prompt)["input_ids"])
        return list(self._prompt_ids[name])

    async def encode_prompt(self, names: Sequence[str]) -> None:
        """Tokenize the prompt for each of `names` now, so that `prompt_ids` costs nothing
        later; a long prompt (~1 s a megabyte per tokenizer) in a worker thread, off the
        event loop that every other request runs on."""

        def encode() -> None:
            for name in names:
                self.prompt_ids(name)

        if len(self.prompt) > PROMPT_CHARS_IN_LOOP:
            await asyncio.to_thread(encode)
        else:
            encode()

    def fingerprint(self, name: str) -> str:
        return self.infos[name].tokenizer_fingerprint

    async def close(self, refs: Sequence[tuple[str, str]]) -> None:
        """Close sessions (model, id); a failure to close one (its replica is gone) is not an
        error. Detached ones are forgotten."""
        self.detached.difference_update(refs)
        results = await asyncio.gather(
            *(self.models[name].close(sid) for name, sid in refs), return_exceptions=True
        )
        for r in results:
            if isinstance(r, Exception):
                log.warning("session_close_failed", error=repr(r))

    async def close_all(self) -> None:
        refs = [(ms.name, ms.session_id) for ms in self._own.values() if ms.session_id]
        for ms in self._own.values():
            ms.session_id = None
        await self.close(refs + sorted(self.detached))
