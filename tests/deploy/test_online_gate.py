"""A deferral gate learnt online by a live app: the base's gate is the policy store's served
link, so a promotion swaps it under a request in flight (which finishes, each turn naming
the gate that decided it); the gate trainer reads the app's turn log and rewards, scores
the assistant's log-probs on its live deployment, judges the candidate through a
coordinator over that deployment, and its promotion reaches the app with no restart."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from ray import serve

from antiphon.actors.gate import GATE_FILENAME, gate_fingerprint, save_gate
from antiphon.checkpoint import load_tokenizer
from antiphon.deploy.app import build_app
from antiphon.deploy.config import parse_config
from antiphon.experiments.train_online import gate_learner_and_judge
from antiphon.training.online_trainer import OnlineTrainConfig, OnlineTrainer, run_online
from antiphon.training.policy_versions import PolicyStore
from antiphon.training.turn_log import TurnRecord, read_records
from tests.deploy.server import http_url
from tests.deploy.test_http import sse_events

pytestmark = pytest.mark.slow

APP = "antiphon-online-gate"
ENSEMBLE = "deferred"
PARAMS = {"base": "base", "assistant": "assistant", "eta": 0.5, "segment_len": 8}


def gate_dir(root, name: str, bias: float):
    out = root / name
    out.mkdir()
    save_gate(out, torch.zeros(64), bias=bias)
    return out


@pytest.fixture(scope="module")
def gate_app(ray_cluster, tiny_model_dir, other_tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("online-gate")
    store = PolicyStore(work / "store")
    # neither fires at eta 0.5: the base writes segment after segment, each naming its gate
    first = store.add_candidate(gate_dir(work, "g0", -20.0), step=0, provenance={})
    second = store.add_candidate(gate_dir(work, "g1", -19.0), step=1, provenance={})
    store.promote(first.version, reason="the initial gate")
    config = parse_config({
        "models": [{"name": "base", "path": str(tiny_model_dir),
                    "gate_path": str(store.served_path / GATE_FILENAME)},
                   {"name": "assistant", "path": str(other_tiny_model_dir)}],
        "ensembles": [{"name": ENSEMBLE, "models": ["base", "assistant"],
                       "policy": {"name": "defer", "params": PARAMS}}],
        "serving": {"turn_log_path": str(work / "turns")},
    })  # fmt: skip
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield http_url(f"/{APP}"), store, first, second, work
    serve.delete(APP)


def logged_turns(log, request_id: str, within_s: float = 60) -> list[TurnRecord]:
    """The request's turn records, once its request record has landed."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        records = [r for r, _ in read_records(log) if getattr(r, "request_id", "") == request_id]
        if any(not isinstance(r, TurnRecord) for r in records):
            return sorted((r for r in records if isinstance(r, TurnRecord)), key=lambda r: r.turn)
        time.sleep(0.2)
    raise AssertionError(f"request {request_id} not logged within {within_s} s")


def test_a_gate_swapped_mid_request_and_one_learnt_online_reach_the_app(gate_app, tiny_model_dir):
    url, store, first, second, work = gate_app
    eos = load_tokenizer(str(tiny_model_dir)).eos_token_id
    body = {"prompt": "Once upon a time", "ensemble": ENSEMBLE, "max_tokens": 64,
            "stream": True, "logit_bias": {str(eos): -100}}  # fmt: skip
    segments, finish = 0, None
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        for event, data in sse_events(response):
            if event == "segment":
                segments += 1
                if segments == 1:  # publish the second gate: the store moves its link
                    store.promote(second.version, reason="better on dev")
            elif event == "done":
                finish = json.loads(data)
    assert finish is not None and finish["finish_reason"] == "length", finish
    gates = [r.gate for r in logged_turns(work / "turns", finish["id"])]
    old = gate_fingerprint(first.path / GATE_FILENAME)
    new = gate_fingerprint(second.path / GATE_FILENAME)
    assert len(gates) == 8 and gates[0] == old and gates[-1] == new
    assert gates[gates.index(new) :] == [new] * (8 - gates.index(new))  # never back

    # traffic with rewards, then the gate trainer over the app's log
    ids = []
    for i in range(6):
        r = httpx.post(f"{url}/v1/generate", timeout=60, json={
            "prompt": f"Q: question {i}?\nA:", "ensemble": ENSEMBLE, "max_tokens": 12,
            "temperature": 1.0, "seed": i})  # fmt: skip
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    for i, request_id in enumerate(ids):
        r = httpx.post(f"{url}/v1/feedback", json={"request_id": request_id, "reward": i % 2},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
    config = OnlineTrainConfig(
        turn_log=str(work / "turns"), store=str(store.root), state_dir=str(work / "state"),
        init=str(first.path), learner="gate", base_checkpoint=str(tiny_model_dir),
        policies=["defer"], consumer="gate-trainer", examples_per_candidate=3, replay=0,
        train={"steps": 20},
        dev={"app": APP, "models": ["base", "assistant"], "policy_params": PARAMS,
             "tasks": ["qa-knowledge"], "limit": 3},
    )  # fmt: skip
    learner, judge = gate_learner_and_judge(config)
    trainer = OnlineTrainer(config, learner, judge)
    run_online(trainer, until_idle=True)
    made = [v for v in store.versions() if v.provenance.get("trainer") == "gate-trainer"]
    assert len(made) == 1 and made[0].dev_score is not None, made
    assert made[0].provenance["examples"] == 3  # the requests rewarded above the baseline
    assert made[0].provenance["parent"] == second.version
    assert made[0].status == "promoted", made[0].reason  # random models tie on dev: kept
    served = gate_fingerprint(store.served_path / GATE_FILENAME)
    assert served == gate_fingerprint(made[0].path / GATE_FILENAME) != new
    after = httpx.post(f"{url}/v1/generate", json={**body, "stream": False, "max_tokens": 8},
                       timeout=60).json()  # fmt: skip
    assert {r.gate for r in logged_turns(work / "turns", after["id"])} == {served}
