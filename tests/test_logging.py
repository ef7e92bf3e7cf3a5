"""Structured logs: where they go when the process's stderr changes after configuration."""

from __future__ import annotations

import io
import json
import sys

from antiphon.logging import configure_logging, get_logger


def test_logs_follow_stderr_replaced_and_closed_after_configure(monkeypatch):
    """A CLI run in-process (a test, a notebook) configures logging under one stderr and a
    later caller logs under another: the log goes to the stderr of now, never to a closed one."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("json")
    first.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    get_logger("antiphon.test").warning("session_lost", model="x")
    line = json.loads(now.getvalue())
    assert line["event"] == "session_lost" and line["model"] == "x" and line["level"] == "warning"
