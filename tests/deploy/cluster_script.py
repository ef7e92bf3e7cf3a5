"""A real multi-node Ray cluster on this machine, run apart from the suite's one local Ray:
`tests/deploy/test_cluster.py` runs this module in a subprocess and asserts on its report.

    RAY_AUTH_MODE=disabled python -m tests.deploy.cluster_script    # last stdout line: JSON

It starts a head (no model resources, Serve's controller and its one HTTP proxy) and two
worker nodes with the custom resources {"node_a": 4} and {"node_b": 4}
(`ray.cluster_utils.Cluster`), deploys an app of two tiny random checkpoints whose model "a"
is pinned to node_a and "b" to node_b by their config's `resources` (two coordinator and two
ingress replicas), and reports:

- `placement`: the nodes (by their custom resource; "head" for none) each deployment's
  replicas run on, read with `ray.util.state.list_actors`;
- `first_answer`: the writers of one request sent end to end over HTTP;
- `node_loss`: under traffic (two threads posting in a loop), the node_b worker is killed as
  a crash would (no graceful shutdown) and a replacement with the same resource is added;
  how many requests failed and how long service was degraded, where b runs afterwards, and
  the writers of a request sent after recovery;
- `shell`: from the shell, as the README says, against the same cluster with Ray's token
  authentication on (the cluster runs under `RAY_AUTH_MODE=token` and the caller's
  `RAY_AUTH_TOKEN`): `antiphon build` of the config, `serve deploy` of the file (it replaces
  the app above), a request to it with the API key its config reads from `ANTIPHON_API_KEY`,
  `ray job submit` of an `antiphon eval` against it and of one that fails, and a job
  submitted with a wrong token: each command's exit status and the end of its output.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from antiphon.checkpoint import load_tokenizer
from antiphon.deploy.app import build_app, free_port
from antiphon.deploy.config import AppConfig, parse_config
from tests.factories import make_tiny_model

APP_NAME = "antiphon"
NODE_RESOURCES = ("node_a", "node_b")
PROMPT = "Once upon a time"
REQUEST_TIMEOUT_S = 60.0
RECOVERY_DEADLINE_S = 120.0  # after the node's loss; the test asserts a tighter bound
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 96 * 1024 * 1024}


@dataclass(frozen=True)
class Outcome:
    """One request of the traffic: when it ran (monotonic s) and how it ended."""

    start: float
    end: float
    ok: bool
    error: str = ""


def app_config(model_a: Path, model_b: Path, turn_log: Path) -> AppConfig:
    return parse_config(
        {
            "models": [
                {"name": "a", "path": str(model_a), "deployment": {"resources": {"node_a": 1}}},
                {"name": "b", "path": str(model_b), "deployment": {"resources": {"node_b": 1}}},
            ],
            "ensembles": [
                {
                    "name": "pair",
                    "models": ["a", "b"],
                    "policy": {"name": "round_robin", "params": {"segment_len": 4}},
                }
            ],
            "serving": {
                "max_concurrent_requests": 8,
                "default_max_tokens": 12,
                "turn_log_path": str(turn_log),
                "coordinator_replicas": 2,
                "ingress_replicas": 2,
            },
        }
    )


def node_labels() -> dict[str, str]:
    """Node id -> the node's custom model resource ("head" for a node with none), alive only."""
    labels = {}
    for node in ray.nodes():
        if node["Alive"]:
            held = [r for r in NODE_RESOURCES if r in node["Resources"]]
            labels[node["NodeID"]] = held[0] if held else "head"
    return labels


def placement() -> dict[str, list[dict[str, str]]]:
    """Deployment -> its live replicas' nodes, each as {"node": label, "node_id": id}."""
    labels = node_labels()
    found: dict[str, list[dict[str, str]]] = {}
    for actor in list_actors(detail=True, filters=[("state", "=", "ALIVE")], limit=1000):
        prefix = f"ServeReplica:{APP_NAME}:"
        if actor.class_name.startswith(prefix):
            deployment = actor.class_name.removeprefix(prefix)
            node = {"node": labels.get(actor.node_id, "dead"), "node_id": actor.node_id}
            found.setdefault(deployment, []).append(node)
    return {d: sorted(nodes, key=lambda n: n["node"]) for d, nodes in sorted(found.items())}


class Traffic:
    """Threads posting one generation request after another until stopped."""

    def __init__(self, url: str, body: dict, threads: int = 2) -> None:
        self.url, self.body = url, body
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 5)

    def _loop(self) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    r = client.post(f"{self.url}/v1/generate", json=self.body)
                    ok, error = r.status_code == 200, "" if r.status_code == 200 else r.text
                except httpx.HTTPError as e:
                    ok, error = False, f"{type(e).__name__}: {e}"
                with self._lock:
                    self.outcomes.append(Outcome(start, time.monotonic(), ok, error[:300]))
                if not ok:
                    time.sleep(0.2)  # a client's back-off: do not spin on a refusal

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def successes(self, started_after: float) -> int:
        return sum(o.ok and o.start > started_after for o in self.snapshot())

    def wait_for(self, successes: int, started_after: float, deadline: float) -> bool:
        """Whether `successes` requests started after `started_after` succeed by `deadline`."""
        while time.monotonic() < deadline:
            if self.successes(started_after) >= successes:
                return True
            time.sleep(0.1)
        return False


def writers(url: str, body: dict) -> list[str]:
    r = httpx.post(f"{url}/v1/generate", json=body, timeout=REQUEST_TIMEOUT_S)
    r.raise_for_status()
    return [s["model"] for s in r.json()["segments"]]


def node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def span_s(outcomes: list[Outcome]) -> float:
    """From the first start to the last end of `outcomes` (0 for none)."""
    if not outcomes:
        return 0.0
    return round(max(o.end for o in outcomes) - min(o.start for o in outcomes), 2)


def node_loss_report(
    outcomes: list[Outcome], removed_at: float, added_at: float, dead_at: float | None
) -> dict:
    """What the traffic saw of the node's loss. `degraded_s`: from the loss until the first
    request sent after it succeeded (service was unavailable or failing meanwhile);
    `declared_dead_after_s`: when Ray's health checks marked the node dead, the earliest
    Serve can start its replicas elsewhere."""
    before = [o.end - o.start for o in outcomes if o.ok and o.end < removed_at]
    after = [o for o in outcomes if o.end >= removed_at]
    failed = [o for o in after if not o.ok]
    first_ok = min((o.end for o in after if o.ok and o.start > removed_at), default=None)
    return {
        "requests": len(after),
        "failed": len(failed),
        "errors": sorted({o.error for o in failed})[:5],
        "failed_after_recovery": sum(first_ok is not None and o.start > first_ok for o in failed),
        "degraded_s": None if first_ok is None else round(first_ok - removed_at, 2),
        "failing_window_s": span_s(failed),
        "replacement_added_after_s": round(added_at - removed_at, 2),
        "declared_dead_after_s": None if dead_at is None else round(dead_at - removed_at, 2),
        "baseline_latency_s": round(statistics.median(before), 3) if before else None,
        "max_latency_s": round(max((o.end - o.start for o in after), default=0.0), 2),
    }


def nodes(replicas: list[dict[str, str]]) -> list[str]:
    return [r["node"] for r in replicas]


def lose_and_replace(cluster: Cluster, node, resource: str, traffic: Traffic) -> dict:
    """Kill `node` as a crash would (no graceful shutdown), add a node with the same
    `resource`, and wait until requests sent after the loss succeed again."""
    lost = node.node_id
    removed_at = time.monotonic()
    cluster.remove_node(node, allow_graceful=False)
    cluster.add_node(**NODE_ARGS, resources={resource: 4})
    added_at, dead_at, recovered = time.monotonic(), None, False
    while not recovered and time.monotonic() < removed_at + RECOVERY_DEADLINE_S:
        if dead_at is None and not node_alive(lost):
            dead_at = time.monotonic()
        recovered = traffic.successes(started_after=removed_at) >= 10
        time.sleep(0.2)
    report = node_loss_report(traffic.snapshot(), removed_at, added_at, dead_at)
    return {**report, "recovered": recovered}


def shell(*argv: str, env: dict[str, str] | None = None, timeout: float = 240) -> dict:
    """A command as a user types it: its exit status and the end of its output."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip
    return {"rc": done.returncode, "out": (done.stdout + done.stderr)[-3000:]}


def wait_for_answer(url: str, body: dict, headers: dict, deadline_s: float = 120) -> int:
    """The status of a request once the app answers it (serve deploy returns before)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            status = httpx.post(f"{url}/v1/generate", json=body, headers=headers,
                                timeout=REQUEST_TIMEOUT_S).status_code  # fmt: skip
        except httpx.TransportError:
            status = 0
        if status not in (0, 404, 503) or time.monotonic() > deadline:
            return status
        time.sleep(1)


def deployed_at(app: str) -> float:
    status = serve.status().applications.get(app)
    return 0.0 if status is None else status.last_deployed_time_s


def wait_until_running(app: str, after: float, deadline_s: float = 180) -> bool:
    """Whether Serve reports `app` deployed after `after` and running, every deployment's
    update completed."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if (
            status is not None
            and status.last_deployed_time_s > after
            and status.status == "RUNNING"
            and all(
                d.status == "HEALTHY" and d.status_trigger == "CONFIG_UPDATE_COMPLETED"
                for d in status.deployments.values()
            )  # fmt: skip
        ):
            return True
        time.sleep(1)
    return False


def client_job(dashboard: str, entrypoint: str, deadline_s: float = 180) -> dict:
    """A job submitted with Ray's `JobSubmissionClient`, as the README shows: its final
    status and logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(dashboard)
    job = jobs.submit_job(entrypoint=entrypoint)
    deadline = time.monotonic() + deadline_s
    while (
        jobs.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        and time.monotonic() < deadline
    ):
        time.sleep(1)  # fmt: skip
    return {"status": str(jobs.get_job_status(job).value), "logs": jobs.get_job_logs(job)[-2000:]}


def from_the_shell(work: Path, config: AppConfig, port: int, dashboard: str, body: dict) -> dict:
    """`antiphon build` + `serve deploy`, then `ray job submit` of an eval against the app."""
    source, built = work / "shell.yaml", work / "serve.yaml"
    serving = {**config.serving.model_dump(mode="json", exclude_unset=True), "port": port,
               "api_key_env": "ANTIPHON_API_KEY"}  # fmt: skip
    raw = {**config.model_dump(mode="json", exclude_unset=True), "serving": serving}
    import yaml

    source.write_text(yaml.safe_dump(raw))
    report = {"build": shell(sys.executable, "-m", "antiphon.cli", "build", str(source),
                             "-o", str(built), "--route-prefix", "/shell")}  # fmt: skip
    before = deployed_at(APP_NAME)
    report["deploy"] = shell("serve", "deploy", str(built), "--address", dashboard)
    # the file redeploys the app (same name): until the rollout ends, replicas of the old
    # version (no API key) may still answer under the new prefix
    report["rolled_out"] = wait_until_running(APP_NAME, after=before)
    url = f"http://127.0.0.1:{port}/shell"
    key = {"Authorization": f"Bearer {os.environ['ANTIPHON_API_KEY']}"}
    report["answer_status"] = wait_for_answer(url, body, key)
    report["keyless_status"] = httpx.post(f"{url}/v1/generate", json=body, timeout=60).status_code
    job = ("ray", "job", "submit", "--address", dashboard, "--", "antiphon", "eval", "--url", url,
           "--ensemble", "pair", "--policy", "round_robin", "--limit", "1")  # fmt: skip
    # as the README says: the working directory (the project) goes with the job
    with_dir = (*job[:5], "--working-dir", ".", *job[5:])
    report["job"] = shell(*with_dir, "--tasks", "knowledge")
    report["failing_job"] = shell(*job, "--tasks", "no-such-task")
    report["client_job"] = client_job(dashboard, f"antiphon status --url {url}")
    report["wrong_token_job"] = shell(*job, "--tasks", "knowledge",
                                      env={"RAY_AUTH_TOKEN": "0" * 32})  # fmt: skip
    return report


def run(work: Path) -> dict:
    model_a = make_tiny_model(work / "a", seed=0)
    model_b = make_tiny_model(work / "b", seed=1)
    # the random models may write eos early: forbid it, so that both always get a turn
    eos = load_tokenizer(str(model_a)).eos_token_id
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 12, "logit_bias": {eos: -100}}

    started = time.monotonic()
    # every port of the head its own: Ray gives the head's dashboard agent (the job server's
    # agent) port 52365 unless told, and another Ray on this machine (the suite's) holds it,
    # which leaves the job server with no agent ("No available agent to submit job")
    head_args = {**NODE_ARGS, "gcs_server_port": free_port(), "dashboard_port": free_port(),
                 "dashboard_agent_listen_port": free_port(), "include_dashboard": True}  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        workers = {r: cluster.add_node(**NODE_ARGS, resources={r: 4}) for r in NODE_RESOURCES}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        # one proxy, on the head: all nodes share this machine's ports
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = app_config(model_a, model_b, work / "turns.atl")
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        report: dict = {"deployed_after_s": round(time.monotonic() - started, 1)}
        report["placement"] = placement()
        report["first_answer"] = writers(url, body)

        with Traffic(url, body) as traffic:
            warm = traffic.wait_for(5, started_after=0.0, deadline=time.monotonic() + 60)
            loss = lose_and_replace(cluster, workers["node_b"], "node_b", traffic)
        loss["replicas_lost"] = {
            d: n for d, rs in report["placement"].items() if (n := nodes(rs).count("node_b"))
        }
        loss.update(warmed_up=warm, placement_after=placement())
        loss["answer_after"] = writers(url, body) if loss["recovered"] else []
        report["node_loss"] = loss
        dashboard = f"http://127.0.0.1:{head_args['dashboard_port']}"
        report["shell"] = from_the_shell(work, config, port, dashboard, body)
        report["total_s"] = round(time.monotonic() - started, 1)
        return report
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="antiphon-cluster-"))
    try:
        report = run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report), flush=True)  # the last line: what the test reads


if __name__ == "__main__":
    main()
