"""The training commands as Ray jobs: `antiphon train gate` and `antiphon train online`, each
submitted to a Ray cluster's job server (a head node started for this test, with its
dashboard), run there to the end, their output on disk."""

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
import yaml

from antiphon.deploy.app import free_port
from antiphon.training.online_trainer import TrainerState
from antiphon.training.policy_versions import PolicyStore
from antiphon.training.turn_log import TurnLogWriter

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
        try:  # a graceful stop takes ~30 s, most of it waiting on idle workers
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the whole group: no Ray process outlives it
            head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def submit_when_ready(client, timeout_s: float = 300.0, **job) -> str:
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


def job_client(dashboard: str):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 120
    while True:  # the job server answers once the head is up
        try:
            return JobSubmissionClient(dashboard)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def run_job(dashboard: str, command: str) -> str:
    """Submit `antiphon <command>` (by the interpreter that runs the suite, as on PATH), wait
    for it to succeed, return its logs."""
    from ray.job_submission import JobStatus

    client = job_client(dashboard)
    job = submit_when_ready(
        client, entrypoint=f"{sys.executable} -m antiphon.cli {command}",
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                             JobStatus.STOPPED}:  # fmt: skip
        assert time.monotonic() < deadline, client.get_job_logs(job)[-2000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-2000:]
    return logs


def test_the_gate_trains_as_a_ray_job(job_cluster, tmp_path):
    out = tmp_path / "gate"
    command = (f"train gate --base zoo:sft --assistant zoo:strong --out {out} "
               "--tasks qa-knowledge --rates 0 1 --weak-steps 20 --marginal-steps 20")  # fmt: skip
    logs = run_job(job_cluster, command)
    card = json.loads((out / "gate_card.json").read_text())
    assert set(card["gates"]) == {"weak_label", "marginal"}
    assert f"wrote {out / 'gate_card.json'}" in logs


def test_the_online_trainer_runs_as_a_ray_job(job_cluster, tmp_path, tiny_model_dir):
    from tests.training.test_online_trainer import config, traffic

    cfg = config(tmp_path, tiny_model_dir)
    with TurnLogWriter(cfg.turn_log) as log:
        end = log.append(traffic(32, good="b"))
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    logs = run_job(job_cluster, f"train online --config {path} --until-idle")
    state = TrainerState.load(tmp_path / "state")
    assert state.offset == end and state.step >= 1
    assert "candidate judged" in logs  # its progress, logged where the job's logs are kept
    made = [v for v in PolicyStore(cfg.store).versions() if v.step >= 1]
    assert len(made) == state.step and all(v.dev_score is not None for v in made)
