"""A real multi-node Ray cluster: each model's replica runs on the node its config's
`resources` pin it to, a request goes end to end over HTTP, and losing a worker node under
traffic degrades service only until its replicas run on a replacement node.

The cluster runs in a subprocess (`tests/deploy/cluster_script.py`): the rest of the suite
shares one in-process local Ray, and a driver belongs to one cluster at a time.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# about 3 minutes alone; in the full suite the machine is shared with its cluster's actors
SCRIPT_TIMEOUT_S = 1200
RECOVERY_BOUND_S = 90.0  # Ray declares a crashed node dead after ~15 s of failed checks


# pytest-timeout counts the first test's share of the fixture: room for the whole script
pytestmark = pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)


@pytest.fixture(scope="module")
def cluster_report() -> dict:
    # Ray's token authentication on, as on a real cluster; the API key its config names
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "ANTIPHON_API_KEY": "cluster-api-key"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)  # the script starts its own cluster; never join another
    done = subprocess.run(
        [sys.executable, "-m", "tests.deploy.cluster_script"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    assert done.returncode == 0, f"cluster script failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def nodes_of(placement: dict, deployment: str) -> list[str]:
    return [replica["node"] for replica in placement[deployment]]


@pytest.mark.slow
def test_replicas_run_on_the_nodes_their_config_pins_them_to(cluster_report):
    placement = cluster_report["placement"]
    assert nodes_of(placement, "a") == ["node_a"]
    assert nodes_of(placement, "b") == ["node_b"]
    # the coordinator and ingress need no model resource: their replicas go anywhere
    assert len(placement["coordinator"]) == 2 and len(placement["Ingress"]) == 2
    assert set(cluster_report["first_answer"]) == {"a", "b"}  # both wrote, over HTTP


@pytest.mark.slow
def test_losing_a_worker_node_degrades_service_until_its_replica_runs_again(
    cluster_report, record_property
):
    loss = cluster_report["node_loss"]
    for key in ("failed", "degraded_s", "declared_dead_after_s", "max_latency_s"):
        record_property(key, loss[key])
    print(f"\nnode loss under traffic: {json.dumps(loss)}")
    assert loss["warmed_up"], "the traffic never succeeded before the node was removed"
    assert loss["recovered"], f"requests did not succeed again: {loss['errors']}"
    assert loss["degraded_s"] is not None and loss["degraded_s"] < RECOVERY_BOUND_S
    # b came back on the replacement node (same resource, a new node), a stayed where it was
    after, before = loss["placement_after"], cluster_report["placement"]
    assert nodes_of(after, "b") == ["node_b"]
    assert after["b"][0]["node_id"] != before["b"][0]["node_id"]
    assert after["a"] == before["a"]
    assert set(loss["answer_after"]) == {"a", "b"}
    # requests fail (if any do) only while the node is being replaced, never after
    assert loss["failed_after_recovery"] == 0, loss["errors"]


@pytest.mark.slow
def test_serve_deploy_and_ray_job_submit_from_the_shell_with_token_auth(cluster_report):
    shell = cluster_report["shell"]
    assert shell["build"]["rc"] == 0, shell["build"]["out"]
    assert shell["deploy"]["rc"] == 0, shell["deploy"]["out"]
    assert shell["rolled_out"], "the deployed file's app never ran"
    assert shell["answer_status"] == 200  # with the key the config reads from the environment
    assert shell["keyless_status"] == 401
    job = shell["job"]
    assert job["rc"] == 0 and "succeeded" in job["out"], job["out"]
    assert "| round_robin | pair |" in job["out"]  # the job's own output comes back
    client = shell["client_job"]  # the JobSubmissionClient of the README
    assert client["status"] == "SUCCEEDED" and "pair" in client["logs"], client["logs"]
    failing = shell["failing_job"]
    assert failing["rc"] != 0 and "unknown task(s) ['no-such-task']" in failing["out"]
    wrong = shell["wrong_token_job"]
    assert wrong["rc"] != 0 and "token" in wrong["out"].lower(), wrong["out"]
