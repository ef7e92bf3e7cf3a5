"""Structured logs: JSON lines when serving, readable console lines in the CLI.

Call `configure_logging("json")` once per process (the ingress and the coordinator do it in
their constructors) or `configure_logging("console")` (the CLI). Context such as the request
id and the turn index is bound with `log_context(...)`; it rides on contextvars, so every log
line written inside the block, in any coroutine of that request, carries it:

    from antiphon.logging import get_logger, log_context
    log = get_logger(__name__)
    with log_context(request_id="req-1"):
        log.info("request_started", ensemble="default")
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import structlog

LogFormat = Literal["json", "console"]


def stderr_logger(*_: object) -> structlog.PrintLogger:
    """A logger writing to sys.stderr as it is at the time of the call, not at configure time:
    whoever replaced it since (a test runner capturing output, a daemon) may have closed the
    old one. stderr, because stdout of the CLI is the answer itself (and may be piped)."""
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(fmt: LogFormat = "console", level: str = "INFO") -> None:
    """Route structlog through one processor chain that ends in JSON or console rendering."""
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,  # request_id, turn, ... bound per request
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=stderr_logger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    """A logger; `name` (usually __name__) is added to every line as `logger_name`."""
    # Initial values, not .bind(): a lazy logger follows configure_logging calls made later.
    return structlog.get_logger(logger_name=name) if name else structlog.get_logger()


@contextmanager
def log_context(**values: str | int | float | None) -> Iterator[None]:
    """Bind values (request_id=..., turn=...) to every log line written inside the block."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
