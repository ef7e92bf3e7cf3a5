"""The session table of one engine: live sessions, their bounds, and the caches kept for reuse.

A session holds its token ids and a KV cache of the first `n_cached` of them. The last token
is never cached: it is "pending", fed by the next call that needs logits. Only the engine's
worker thread uses the table.

Bounds: at most `max_sessions` live sessions and `max_cached_tokens` tokens held (live
sessions and retained caches together); room is made by dropping retained caches, then the
least recently used idle sessions. A session unused for `idle_timeout_s` expires. A gone
session's id is remembered with the reason, so a late call learns why (`SessionLost`).

Prefix reuse: a closed session's cache is retained (the last RETAINED_CACHES of them), and
before a session feeds tokens, `reuse_prefix` looks for the live or retained cache that shares
the longest prefix with it and takes that part as views (tensors are never written in place,
see `antiphon.actors.kv`). So sessions opened on one prompt, or a prompt that grows by a
segment a turn (the switcher's), prefill only what is new.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from antiphon.actors import kv as kvcache
from antiphon.actors.calls import Call
from antiphon.errors import InvalidRequest, Overloaded, PromptTooLong, SessionLost

FORGOTTEN_IDS_KEPT = 10_000  # recently gone session ids remembered to say why they are gone
RETAINED_CACHES = 16  # caches of closed sessions kept for prefix reuse
REUSE_MIN_TOKENS = 16  # a shared prefix shorter than this is fed again rather than looked up


@dataclass(eq=False)  # compared by identity
class Session:
    session_id: str
    token_ids: list[int]
    kv: kvcache.SessionKV  # cache of token_ids[:n_cached]; empty while in the decode batch
    n_cached: int
    last_used: float
    calls: deque[Call] = field(default_factory=deque)  # head runs; the rest wait their turn


@dataclass(frozen=True)
class RetainedCache:
    """The cache of a closed session, kept so that a new session can start from it."""

    token_ids: tuple[int, ...]  # the tokens the cache covers
    kv: kvcache.SessionKV


def shared_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SessionTable:
    """Live sessions (least recently used first), retained caches, and their accounting."""

    def __init__(
        self,
        model_name: str,
        max_sessions: int,
        max_cached_tokens: int,
        idle_timeout_s: float,
        id_prefix: str = "",
        prefix_reuse: bool = True,
    ) -> None:
        self.model_name = model_name
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.idle_timeout_s = idle_timeout_s
        self.id_prefix = id_prefix
        self.prefix_reuse = prefix_reuse  # off: close forgets caches, reuse_prefix finds none
        self.live: OrderedDict[str, Session] = OrderedDict()
        self.retained: OrderedDict[int, RetainedCache] = OrderedDict()  # oldest first
        self._gone: OrderedDict[str, str] = OrderedDict()  # session id -> why it is gone
        self.tokens_held = 0  # tokens of live sessions
        self.retained_tokens = 0  # tokens covered by retained caches
        self.reused_tokens = 0  # cached positions taken from other caches since start
        self._next_retained = 0

    # -- lifecycle ------------------------------------------------------------------------

    def new(self, token_ids: list[int], kv: kvcache.SessionKV, n_cached: int) -> Session:
        session_id = f"{self.id_prefix}{uuid.uuid4().hex}"
        session = Session(session_id, token_ids, kv, n_cached, time.monotonic())
        self.live[session_id] = session
        self.tokens_held += len(token_ids)
        return session

    def lookup(self, session_id: str) -> Session:
        session = self.live.get(session_id)
        if session is not None:
            return session
        why = self._gone.get(session_id)
        if why is None:
            raise SessionLost(f"unknown session {session_id!r} on model {self.model_name!r}")
        raise SessionLost(f"session {session_id!r} on model {self.model_name!r} is gone: {why}")

    def touch(self, session: Session) -> None:
        session.last_used = time.monotonic()
        self.live.move_to_end(session.session_id)

    def forget(self, session: Session, why: str) -> None:
        """Drop a session; its waiting calls fail with SessionLost naming `why`."""
        if self.live.pop(session.session_id, None) is None:
            return
        self.tokens_held -= len(session.token_ids)
        self._gone[session.session_id] = why
        while len(self._gone) > FORGOTTEN_IDS_KEPT:
            self._gone.popitem(last=False)
        lost = SessionLost(f"session {session.session_id!r} is gone: {why}")
        for call in session.calls:
            call.resolve(error=lost)
        session.calls.clear()
        session.kv = []

    def close(self, session: Session) -> None:
        """Forget a session at its caller's request, keeping its cache for prefix reuse."""
        if self.prefix_reuse and session.kv and session.n_cached >= REUSE_MIN_TOKENS:
            self.retained[self._next_retained] = RetainedCache(
                tuple(session.token_ids[: session.n_cached]), session.kv
            )
            self._next_retained += 1
            self.retained_tokens += session.n_cached
            while len(self.retained) > RETAINED_CACHES:
                self._drop_oldest_retained()
        self.forget(session, "closed")

    def _drop_oldest_retained(self) -> None:
        _, cache = self.retained.popitem(last=False)
        self.retained_tokens -= len(cache.token_ids)

    def expire_idle(self) -> None:
        deadline = time.monotonic() - self.idle_timeout_s
        expired = [s for s in self.live.values() if not s.calls and s.last_used < deadline]
        for session in expired:
            self.forget(session, f"expired after {self.idle_timeout_s:g}s idle")

    def has_calls(self) -> bool:
        return any(s.calls for s in self.live.values())

    def busy(self) -> list[Session]:
        """Sessions with calls waiting, least recently used first."""
        return [s for s in self.live.values() if s.calls]

    # -- bounds ---------------------------------------------------------------------------

    def make_room(self, new_tokens: int, new_sessions: int, strict: bool = True) -> None:
        """Drop retained caches, then least recently used idle sessions, until the new ones
        fit the caps; Overloaded if they still do not and `strict`."""

        def over() -> bool:
            return (
                len(self.live) + new_sessions > self.max_sessions
                or self.tokens_held + self.retained_tokens + new_tokens > self.max_cached_tokens
            )

        if not over():
            return
        if new_tokens > self.max_cached_tokens:
            raise PromptTooLong(
                f"{new_tokens} new tokens exceed model {self.model_name!r}'s whole cache budget "
                f"(max_cached_tokens={self.max_cached_tokens})"
            )
        while self.retained and over():
            self._drop_oldest_retained()
        for session in [s for s in self.live.values() if not s.calls]:
            if not over():
                return
            self.forget(session, "evicted (least recently used, engine at capacity)")
        if strict and over():
            raise Overloaded(
                f"model {self.model_name!r} is full ({len(self.live)} sessions, "
                f"{self.tokens_held} tokens, all busy): retry later"
            )

    # -- changing a session ---------------------------------------------------------------

    def grow(self, session: Session, token_ids: list[int], max_context: int) -> None:
        """Add tokens to a session, not yet fed (a forward pass feeds them)."""
        if len(session.token_ids) + len(token_ids) > max_context:
            raise PromptTooLong(
                f"appending {len(token_ids)} tokens to session {session.session_id!r} "
                f"({len(session.token_ids)} tokens) exceeds the context of {max_context}"
            )
        session.token_ids.extend(token_ids)
        self.tokens_held += len(token_ids)
        self.make_room(0, 0, strict=False)

    def add_written(self, session: Session, token: int) -> None:
        """A token the model wrote for this session (checked against the context already)."""
        session.token_ids.append(token)
        self.tokens_held += 1

    def truncate(self, session: Session, length: int) -> None:
        if not 1 <= length <= len(session.token_ids):
            raise InvalidRequest(
                f"cannot truncate session {session.session_id!r} to {length} tokens: it "
                f"has {len(session.token_ids)}"
            )
        self.tokens_held -= len(session.token_ids) - length
        del session.token_ids[length:]
        session.n_cached = min(session.n_cached, length - 1)  # the last token stays pending
        session.kv = kvcache.crop(session.kv, session.n_cached)

    def fork(self, session: Session, n: int, length: int | None) -> list[Session]:
        """n new sessions holding the first `length` tokens (None: all) and their cache."""
        length = len(session.token_ids) if length is None else length
        if not 1 <= length <= len(session.token_ids):
            raise InvalidRequest(
                f"cannot fork session {session.session_id!r} at {length} tokens: it has "
                f"{len(session.token_ids)}"
            )
        n_cached = min(session.n_cached, length - 1)
        kv = kvcache.crop(session.kv, n_cached)
        self.make_room(length * n, n)
        return [self.new(list(session.token_ids[:length]), kv, n_cached) for _ in range(n)]

    def reuse_prefix(self, session: Session) -> int:
        """Take the longest cached prefix another cache shares with this session's tokens
        (all but the pending last one), if it covers REUSE_MIN_TOKENS more than the session's
        own cache; return the positions gained."""
        uncached = len(session.token_ids) - 1 - session.n_cached  # checked first: every call asks
        if not self.prefix_reuse or uncached < REUSE_MIN_TOKENS:
            return 0
        target = session.token_ids[:-1]
        best_len, best_kv = session.n_cached, None
        least = session.n_cached + REUSE_MIN_TOKENS - 1  # a useful cache matches up to here
        caches = [(s.token_ids, s.n_cached, s.kv) for s in self.live.values() if s.kv]
        caches += [(c.token_ids, len(c.token_ids), c.kv) for c in self.retained.values()]
        for tokens, cached, kv in caches:
            if best_len == len(target):
                break
            # One position rules most caches out at once: to beat the best so far a cache
            # must match there too (sessions that share only a system prompt differ there).
            probe = max(least, best_len)
            if cached <= probe or tokens[probe] != target[probe]:
                continue
            n = min(shared_prefix(tokens, target), cached)
            if n > best_len:
                best_len, best_kv = n, kv
        if best_kv is None or best_len - session.n_cached < REUSE_MIN_TOKENS:
            return 0
        gained = best_len - session.n_cached
        session.kv, session.n_cached = kvcache.crop(best_kv, best_len), best_len
        self.reused_tokens += gained
        return gained
