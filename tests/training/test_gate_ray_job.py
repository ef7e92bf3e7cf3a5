"""`antiphon train gate` as a Ray job: submitted to a Ray cluster's job server (a head node
started for this test, with its dashboard), run there to the end, its card on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from antiphon.deploy.app import free_port

pytestmark = pytest.mark.slow


@pytest.fixture()
def job_cluster():
    """A head node of its own (not the suite's cluster), stopped with its processes."""
    port, dashboard = free_port(), free_port()
    # the agents' default ports are fixed: the suite's own cluster may hold them already
    agents = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port")]  # fmt: skip
    # a short temp dir: Ray's unix sockets live there, and their paths are capped near 107
    temp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp}", *agents],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def submit_when_ready(client, timeout_s: float = 120.0, **job) -> str:
    """Submit once the head's job agent is up (the job server answers before it is: "No
    available agent to submit job, please try again later")."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_the_gate_trains_as_a_ray_job(job_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:  # the job server answers once the head is up
        try:
            client = JobSubmissionClient(job_cluster)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    out = tmp_path / "gate"
    job = submit_when_ready(
        client,
        # the `antiphon` command, by the interpreter that runs the suite (as on PATH)
        entrypoint=f"{sys.executable} -m antiphon.cli train gate --base zoo:sft "
        f"--assistant zoo:strong --out {out} "
        "--tasks qa-knowledge --rates 0 1 --weak-steps 20 --marginal-steps 20",
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    deadline = time.monotonic() + 300
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                             JobStatus.STOPPED}:  # fmt: skip
        assert time.monotonic() < deadline, client.get_job_logs(job)[-2000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-2000:]
    card = json.loads((out / "gate_card.json").read_text())
    assert set(card["gates"]) == {"weak_label", "marginal"}
    assert f"wrote {out / 'gate_card.json'}" in logs
