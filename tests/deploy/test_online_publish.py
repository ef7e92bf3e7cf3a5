"""Publishing a new switcher to a live app: the ensemble's switch policy is hosted (one named
policy actor, its checkpoint the policy store's served link); a promotion and a reload,
as the online trainer makes them, swap the weights under a request in flight, which
finishes, its turns naming the version that decided each."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import ray
from ray import serve

from antiphon.checkpoint import load_tokenizer, weights_fingerprint
from antiphon.deploy.app import build_app, hosted_policy_actor_name
from antiphon.deploy.config import parse_config
from antiphon.policies.actor import POLICY_NAMESPACE
from antiphon.training.online_trainer import actor_publisher
from antiphon.training.policy_versions import PolicyStore
from antiphon.training.turn_log import TurnRecord, read_records
from tests.deploy.server import http_url
from tests.deploy.test_http import sse_events
from tests.factories import make_tiny_model

pytestmark = pytest.mark.slow

APP = "antiphon-online"
ENSEMBLE = "switched"


@pytest.fixture(scope="module")
def online_app(ray_cluster, tiny_model_dir, other_tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("online")
    store = PolicyStore(work / "store")
    first = store.add_candidate(make_tiny_model(work / "s0", seed=2), step=0, provenance={})
    second = store.add_candidate(make_tiny_model(work / "s1", seed=3), step=1, provenance={})
    store.promote(first.version, reason="the initial switcher")
    config = parse_config({
        "models": [{"name": "a", "path": str(tiny_model_dir)},
                   {"name": "b", "path": str(other_tiny_model_dir)}],
        "ensembles": [{"name": ENSEMBLE, "models": ["a", "b"], "policy": {
            "name": "switch", "hosted": True,
            "params": {"switcher_path": str(store.served_path), "segment_len": 1}}}],
        "serving": {"turn_log_path": str(work / "turns")},
    })  # fmt: skip
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield http_url(f"/{APP}"), store, first, second, work / "turns"
    serve.delete(APP)
    ray.kill(ray.get_actor(hosted_policy_actor_name(ENSEMBLE), namespace=POLICY_NAMESPACE))


def turn_versions(log, request_id: str, turns: int, within_s: float = 60) -> list[str]:
    """The policy version of each turn of the request, once all its turns are logged."""
    deadline = time.monotonic() + within_s
    while True:
        found = [r for r, _ in read_records(log) if isinstance(r, TurnRecord)
                 and r.request_id == request_id]  # fmt: skip
        if len(found) >= turns or time.monotonic() > deadline:
            return [r.policy_version for r in sorted(found, key=lambda r: r.turn)]
        time.sleep(0.2)


def test_a_published_switcher_takes_over_mid_request_and_nothing_fails(online_app, tiny_model_dir):
    url, store, first, second, log = online_app
    eos = load_tokenizer(str(tiny_model_dir)).eos_token_id
    body = {"prompt": "Once upon a time", "ensemble": ENSEMBLE, "max_tokens": 200,
            "stream": True, "logit_bias": {str(eos): -100}}  # fmt: skip
    segments, finish, request_id = 0, None, ""
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=120) as response:
        assert response.status_code == 200
        for event, data in sse_events(response):
            if event == "segment":
                segments += 1
                if segments == 1:  # one turn decided by the first version: publish the second
                    store.promote(second.version, reason="better on dev")
                    actor_publisher(hosted_policy_actor_name(ENSEMBLE))(store.served())
            elif event == "done":
                finish = json.loads(data)
                request_id = finish["id"]
    assert finish is not None and finish["finish_reason"] == "length", finish
    versions = turn_versions(log, request_id, turns=200)
    old, new = weights_fingerprint(first.path), weights_fingerprint(second.path)
    assert len(versions) == 200
    assert versions[0] == old and versions[-1] == new  # swapped under the request
    assert set(versions) == {old, new}
    swap = versions.index(new)
    assert versions[swap:] == [new] * (200 - swap)  # never back to the old one

    # a rollback is a publication too
    store.rollback()
    actor_publisher(hosted_policy_actor_name(ENSEMBLE))(store.served())
    again = httpx.post(f"{url}/v1/generate", json={**body, "stream": False, "max_tokens": 4},
                       timeout=60).json()  # fmt: skip
    assert set(turn_versions(log, again["id"], turns=4)) == {old}
