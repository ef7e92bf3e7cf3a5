"""A failure that is not the client's: the answer names a reference, the log has the rest."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from antiphon.deploy.ingress import install_error_handlers, internal_error_message

# What a Ray task error's text carries (issue 10): a remote traceback, a pid, a node address.
RAY_LIKE = (
    "ray::ServeReplica:app:Coordinator.generate() (pid=4242, ip=10.1.2.3, actor_id=ab12)\n"
    'Traceback (most recent call last):\n  File "/srv/antiphon/coordinator/loop.py", line 9'
)


def failing_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(RAY_LIKE)

    return app


def test_a_500_names_a_reference_and_none_of_the_internals():
    client = TestClient(failing_app(), raise_server_exceptions=False)
    with capture_logs() as logged:
        r = client.get("/boom")
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error"
    for leaked in ("Traceback", "pid=", "10.1.2.3", "/srv/antiphon", "RuntimeError"):
        assert leaked not in r.text
    reference = re.fullmatch(r"internal error \(reference (\w{12});.*\)", error["message"])
    assert reference
    (entry,) = [e for e in logged if e["event"] == "internal_error"]
    assert entry["reference"] == reference.group(1)
    assert "10.1.2.3" in entry["error"]  # the operator's log gets it all


def test_a_stream_error_is_worded_the_same_way():
    first, second = (internal_error_message(RuntimeError(RAY_LIKE)) for _ in range(2))
    assert "10.1.2.3" not in first and "Traceback" not in first
    assert first != second  # one reference per failure
