"""Typed errors that cross process boundaries.

Every error a caller can act on has its own class. They pickle with their message only, so a
Ray task error re-raised on the caller's side is still an instance of the same class
(Ray's `RayTaskError` subclasses the cause), and the HTTP ingress maps each class to one
status code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from pydantic import ValidationError

T = TypeVar("T")


class AntiphonError(Exception):
    """Base of every error antiphon raises on purpose."""

    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))


class InvalidRequest(AntiphonError):
    """The caller sent something malformed or out of range; the message names the field."""

    http_status = 400


class PromptTooLong(InvalidRequest):
    """The prompt (or session plus new tokens) does not fit the model's context."""


class NotFound(AntiphonError):
    """An unknown model, ensemble or policy was named."""

    http_status = 404


class SessionLost(AntiphonError):
    """The session is unknown here: never opened, closed, evicted, or its replica is gone.

    The caller still holds the sequence (the coordinator's state is the source of truth), so
    the remedy is always the same: open a new session from that sequence.
    """

    http_status = 409


class Overloaded(AntiphonError):
    """No capacity right now (session cap with nothing evictable, queue full). Retry later."""

    http_status = 503


class Unreachable(AntiphonError):
    """A remote endpoint a model lives behind did not answer (refused, timed out, failed)."""

    http_status = 502


async def retry_overloaded(call: Callable[[], Awaitable[T]], tries: int = 20) -> T:
    """`await call()`, retried with exponential backoff (50 ms doubling, at most 2 s) while it
    raises `Overloaded`, the one error that says "later": a busy model or server must not cost
    a batch job its item. The last try's error propagates."""
    for attempt in range(tries - 1):
        try:
            return await call()
        except Overloaded:
            await asyncio.sleep(min(0.05 * 2**attempt, 2.0))
    return await call()


def antiphon_cause(exc: BaseException) -> AntiphonError | None:
    """The antiphon error behind an exception, or None if there is none: the cause a remote
    call wraps it in (Ray's `RayTaskError` carries it as `cause`, and its class derives from
    the cause's, so the cause is asked first: it has the plain message), or the error itself."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, AntiphonError):
        return cause
    return exc if isinstance(exc, AntiphonError) else None


async def unwrapped(call: Awaitable[T]) -> T:
    """Await a remote call (a Ray actor or Serve handle call); an antiphon error raised
    behind it comes back as itself, not in Ray's wrapper."""
    try:
        return await call
    except Exception as e:
        err = antiphon_cause(e)
        if err is not None and err is not e:
            raise err from None
        raise


def validation_message(error: ValidationError, what: str) -> str:
    """A pydantic error as one line per problem: 'what.field.sub: message'."""
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in (what, *err["loc"]))
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class ConfigError(InvalidRequest):
    """A config file (YAML) is missing, unreadable or invalid; the message names file and field."""


class Unauthorized(AntiphonError):
    """The HTTP API needs an API key (`Authorization: Bearer KEY`) and got none or a wrong one."""

    http_status = 401
