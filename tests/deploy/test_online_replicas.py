"""Several coordinator replicas write one turn log and one trainer reads it: the requests
that ran side by side on two replicas (each request record names its replica), in a log
rotated at the configured segment size, are each joined with their reward exactly once."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from antiphon.deploy.app import build_app
from antiphon.deploy.config import parse_config
from antiphon.training.online_learners import SwitchLearner
from antiphon.training.online_trainer import OnlineTrainConfig, OnlineTrainer, examples_judge
from antiphon.training.turn_log import FeedbackRecord, RequestRecord, read_records
from tests.deploy.server import http_url
from tests.training.test_online_trainer import dev_examples

pytestmark = pytest.mark.slow

APP = "antiphon-replicas"
REQUESTS = 16


@pytest.fixture(scope="module")
def two_replica_app(ray_cluster, tiny_model_dir, other_tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("replicas")
    config = parse_config({
        "models": [{"name": "a", "path": str(tiny_model_dir)},
                   {"name": "b", "path": str(other_tiny_model_dir)}],
        "ensembles": [{"name": "random", "models": ["a", "b"],
                       "policy": {"name": "random_switch", "params": {"segment_len": 2}}}],
        "serving": {"turn_log_path": str(work / "turns"), "coordinator_replicas": 2,
                    "turn_log_segment_bytes": 4096},
    })  # fmt: skip
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield http_url(f"/{APP}"), work
    serve.delete(APP)


async def traffic(url: str) -> list[str]:
    """REQUESTS requests at once, then a reward for each (1 for every third)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        responses = await asyncio.gather(*(client.post("/v1/generate", json={
            "prompt": f"Q: question {i}?\nA:", "ensemble": "random", "max_tokens": 8,
            "seed": i}) for i in range(REQUESTS)))  # fmt: skip
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        ids = [r.json()["id"] for r in responses]
        for i, request_id in enumerate(ids):
            r = await client.post(
                "/v1/feedback", json={"request_id": request_id, "reward": float(i % 3 == 0)}
            )
            assert r.status_code == 200, r.text
    return ids


def test_one_trainer_joins_what_two_coordinator_replicas_logged(
    two_replica_app, tiny_model_dir, tmp_path
):
    url, work = two_replica_app
    ids = asyncio.run(traffic(url))
    deadline = time.monotonic() + 60
    while sum(isinstance(r, FeedbackRecord) for r, _ in read_records(work / "turns")) < REQUESTS:
        assert time.monotonic() < deadline, "feedback not logged"
        time.sleep(0.2)
    requests = [r for r, _ in read_records(work / "turns") if isinstance(r, RequestRecord)]
    assert sorted(r.request_id for r in requests) == sorted(ids)
    assert len({r.coordinator for r in requests}) == 2  # both replicas wrote the log
    assert len(list((work / "turns").glob("*.atl"))) > 1  # rotated at the configured size

    cfg = OnlineTrainConfig(
        turn_log=str(work / "turns"), store=str(tmp_path / "store"),
        state_dir=str(tmp_path / "state"), init=str(tiny_model_dir),
        policies=["random_switch"], examples_per_candidate=10**6, replay=0,
        dev={"examples": str(dev_examples(tmp_path / "dev"))},
    )  # fmt: skip
    trainer = OnlineTrainer(cfg, SwitchLearner(cfg.train), examples_judge(cfg.dev.examples))
    trainer.poll()
    counters = trainer.joiner.counters
    assert (counters.requests, counters.rewarded, counters.failed) == (REQUESTS, REQUESTS, 0)
    assert counters.duplicate_feedback == counters.unknown_feedback == 0
    # one example per segment of each request rewarded above the baseline, each once
    rewarded = {request_id for i, request_id in enumerate(ids) if i % 3 == 0}
    segments = {r.request_id: r.num_segments for r in requests}
    keys = [e["key"] for e in trainer.state.pending]
    assert len(keys) == len(set(keys)) == sum(segments[r] for r in rewarded)
    assert {k.rsplit(":", 1)[0] for k in keys} == rewarded
