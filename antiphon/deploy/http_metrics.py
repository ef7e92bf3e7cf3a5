"""The HTTP ingress's metrics: an ASGI middleware that counts and times every answer, and the
calls by which the routes tell it what only they know.

`RecordHttpMetrics`, the app's outermost middleware, opens a `RequestMeter` per request
(in a contextvar, so any coroutine of the request reaches it); when the answer's last byte
is sent it records `antiphon_requests` and `antiphon_request_latency_seconds`, and
`antiphon_request_errors` for an error answer, with the route's template as the endpoint (a
path no route has is "other": a scanner's paths must not each make a series of their own).
The routes call `note_ensemble` once they know the ensemble, the error paths `note_error`
(a stream's error comes after its 200), the streams `note_first_segment`.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from antiphon import metrics
from antiphon.logging import get_logger

log = get_logger(__name__)

OTHER_ENDPOINT = "other"  # a path that no route has
NO_ENSEMBLE = "-"  # a request that named none, or one the config does not have
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before its answer


@dataclass
class RequestMeter:
    """What one request's metrics need, filled in while it runs."""

    endpoint: str
    ensemble: str = NO_ENSEMBLE
    error: str | None = None  # the error kind of an error answer, once one is known
    error_status: int | None = None  # its status (a stream's error: the error's own)
    first_segment_s: float | None = None  # seconds from arrival to the first segment
    started: float = field(default_factory=time.perf_counter)


_meter: contextvars.ContextVar[RequestMeter | None] = contextvars.ContextVar(
    "antiphon_request_meter", default=None
)


def note_ensemble(name: str) -> None:
    """The request's ensemble (a configured one: its name is a bounded tag value)."""
    meter = _meter.get()
    if meter is not None:
        meter.ensemble = name


def note_error(status: int, code: str | None) -> None:
    """The request is answered with an error: its HTTP status and code (the antiphon error
    class), if it has one."""
    meter = _meter.get()
    if meter is not None:
        meter.error, meter.error_status = error_kind(status, code), status


def note_first_segment() -> None:
    """The request's first segment is here (its first event, for a stream)."""
    meter = _meter.get()
    if meter is not None and meter.first_segment_s is None:
        meter.first_segment_s = time.perf_counter() - meter.started


def error_kind(status: int, code: str | None) -> str:
    """The `error` tag: the antiphon error class, else InternalError for a 5xx, ClientClosed
    for a client that left, else HTTPnnn (the framework's own answers: an unknown route or
    method, a body over the limit)."""
    if code:
        return code
    if status == CLIENT_CLOSED:
        return "ClientClosed"
    return "InternalError" if status >= 500 else f"HTTP{status}"


class RecordHttpMetrics:
    """ASGI middleware, outermost: records each HTTP answer's metrics once its last byte is
    sent (or its app failed). `endpoints`: the app's route paths, templates included."""

    def __init__(self, app: ASGIApp, endpoints: Iterable[str]) -> None:
        self.app = app
        self.endpoints = [(_template_pattern(path), path) for path in endpoints]

    def endpoint(self, path: str) -> str:
        for pattern, template in self.endpoints:
            if pattern.fullmatch(path):
                return template
        return OTHER_ENDPOINT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        meter = RequestMeter(self.endpoint(_route_path(scope)))
        status = 500  # what the client gets if the app fails before answering

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = _meter.set(meter)
        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # Serve cancels a request whose client went away
            raise
        except BaseException:
            status = 500  # Starlette's outermost handler answers it, outside this middleware
            raise
        finally:
            _meter.reset(token)
            _record(meter, status)


def _record(meter: RequestMeter, status: int) -> None:
    elapsed = time.perf_counter() - meter.started
    route = {"endpoint": meter.endpoint, "ensemble": meter.ensemble}
    metrics.record(metrics.REQUESTS, 1, **route)
    metrics.record(metrics.REQUEST_LATENCY, elapsed, **route)
    if meter.first_segment_s is not None:
        metrics.record(metrics.TIME_TO_FIRST_SEGMENT, meter.first_segment_s, **route)
    if status >= 400:  # the answer is the error (an app that failed: Starlette's 500)
        noted = meter.error is not None and meter.error_status == status
        kind = meter.error if noted else error_kind(status, None)
        metrics.record(metrics.REQUEST_ERRORS, 1, endpoint=meter.endpoint, error=kind,
                       status=str(status))  # fmt: skip
    elif meter.error is not None:  # a 200 stream that ended in an error event
        metrics.record(metrics.REQUEST_ERRORS, 1, endpoint=meter.endpoint, error=meter.error,
                       status=str(meter.error_status))  # fmt: skip


def route_templates(app: FastAPI) -> list[str]:
    """The path of every route of `app`, "{name}" where a parameter goes: the schema's paths
    (an included router's routes with its prefix) and the routes the app holds itself (the
    docs, and routes left out of the schema)."""
    own = [route.path for route in app.routes if isinstance(getattr(route, "path", None), str)]
    try:
        schema = list(app.openapi()["paths"])
    except Exception as e:  # the metrics must not keep the app from starting
        log.warning("metrics_routes_unknown", error=repr(e))
        schema = []
    return list(dict.fromkeys([*schema, *own]))


def _template_pattern(path: str) -> re.Pattern[str]:
    """A route path as a pattern of the paths it serves ("{model_id}": one path segment)."""
    parts = re.split(r"(\{[^}]*\})", path)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def _route_path(scope: Scope) -> str:
    """The path inside the app: Serve mounts it under its route prefix (the root path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
