"""The coordinator as a Serve deployment on a real local Ray cluster, with its model
deployments, a hosted policy actor and the turn log actor; results checked against the
in-process coordinator over engines of the same checkpoints."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import ray
from ray import serve

from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import FinishEvent, GenerationRequest, SegmentEvent
from antiphon.deploy.app import build_coordinator_app
from antiphon.errors import InvalidRequest, NotFound
from antiphon.policies.actor import start_policy_actor
from antiphon.training.turn_log import FeedbackRecord, RequestRecord, TurnLogReader, TurnRecord
from antiphon.training.turn_log_actor import get_or_create_turn_log

pytestmark = pytest.mark.slow

APP = "test-coordinator"
HOSTED = {"seed": 3, "segment_len": 4}  # the random_switch the policy actor hosts
PROMPT = "Once upon a time, "


@pytest.fixture(scope="module")
def served(ray_cluster, model_dirs, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("turnlog") / "turns.atl")
    log_name = f"test-turn-log-{uuid.uuid4().hex[:8]}"
    policy = start_policy_actor("random_switch", HOSTED)
    specs = [ModelSpec(name=n, path=str(model_dirs[n][0])) for n in ("a", "b")]
    app = build_coordinator_app(
        specs, log_path, {"random_switch": policy}, turn_log_actor_name=log_name
    )
    handle = serve.run(app, name=APP, route_prefix=None)
    yield handle, log_path, policy
    serve.delete(APP)
    ray.kill(policy)
    ray.kill(get_or_create_turn_log(log_path, name=log_name))


def req(**kw) -> GenerationRequest:
    fields = dict(prompt=PROMPT, models=("a", "b"), max_tokens=20)
    fields.update(kw)
    return GenerationRequest(**fields)


def test_generate_through_the_deployment_equals_in_process(served, engines, tokenizers):
    handle, _, _ = served
    r = req(policy="round_robin", policy_params={"segment_len": 5})
    remote = handle.generate.remote(r).result()
    local = asyncio.run(Coordinator(engines, tokenizers).generate(r))
    assert [(s.model, s.token_ids) for s in remote.segments] == [
        (s.model, s.token_ids) for s in local.segments
    ]
    assert remote.text == local.text and remote.finish_reason == local.finish_reason


def test_stream_yields_segments_then_finish(served):
    handle, _, _ = served
    r = req(policy="round_robin", policy_params={"segment_len": 3})
    events = list(handle.options(stream=True).stream.remote(r))
    assert all(isinstance(e, SegmentEvent) for e in events[:-1])
    assert isinstance(events[-1], FinishEvent)
    result = handle.generate.remote(r).result()
    assert "".join(e.text for e in events[:-1]) == result.text
    assert [e.model for e in events[:-1]] == [s.model for s in result.segments]


def test_hosted_policy_decides_through_its_actor(served, engines, tokenizers):
    handle, _, _ = served
    r = req(policy="random_switch", policy_params=HOSTED)
    remote = handle.generate.remote(r).result()
    local = asyncio.run(Coordinator(engines, tokenizers).generate(r))
    assert [s.model for s in remote.segments] == [s.model for s in local.segments]
    # other parameters: the policy they name, built in the coordinator
    other = req(policy="random_switch", policy_params={"seed": 4})
    remote = handle.generate.remote(other).result()
    local = asyncio.run(Coordinator(engines, tokenizers).generate(other))
    assert [s.model for s in remote.segments] == [s.model for s in local.segments]


def test_client_mistakes_are_typed_through_the_handle(served):
    handle, _, _ = served
    with pytest.raises(NotFound, match="no_such_policy"):
        handle.generate.remote(req(policy="no_such_policy")).result()
    with pytest.raises(NotFound, match="unknown model"):
        handle.generate.remote(req(models=("a", "nope"))).result()
    assert handle.generate.remote(req(max_tokens=3)).result().usage.completion_tokens <= 3


def test_turns_and_feedback_reach_the_one_log(served):
    handle, log_path, _ = served
    requests = [req(policy="round_robin", policy_params={"segment_len": 4}) for _ in range(3)]
    results = [handle.generate.remote(r).result() for r in requests]
    handle.feedback.remote(requests[0].request_id, 0.5).result()
    handle.flush_turn_log.remote().result()
    records = [rec for rec, _ in TurnLogReader(log_path)]
    for r, result in zip(requests, results, strict=True):
        mine = [x for x in records if getattr(x, "request_id", None) == r.request_id]
        turns = [x for x in mine if isinstance(x, TurnRecord)]
        assert [t.segment for t in turns] == list(range(len(result.segments)))
        assert "".join(t.text for t in turns) == result.text
        summary = [x for x in mine if isinstance(x, RequestRecord)]
        assert len(summary) == 1 and summary[0].num_segments == len(turns)
    feedback = [x for x in records if isinstance(x, FeedbackRecord)]
    assert [(f.request_id, f.reward) for f in feedback] == [(requests[0].request_id, 0.5)]


def test_a_tiny_temperature_is_greedy_and_fails_none_of_the_requests_batched_with_it(served):
    """Dividing logits by 5e-324 overflowed to nan and failed the whole decode batch."""
    handle, _, _ = served
    normal = [req(prompt=f"{PROMPT}{i} ", policy="round_robin", seed=i) for i in range(8)]
    alone = [handle.generate.remote(r).result() for r in normal]
    tiny = req(policy="round_robin", temperature=5e-324, seed=1)
    greedy = handle.generate.remote(req(policy="round_robin")).result()
    together = [handle.generate.remote(r) for r in [tiny, *normal]]  # batched on the engines
    tiny_result, *batched = [r.result() for r in together]
    assert tiny_result.text == greedy.text
    assert [r.text for r in batched] == [r.text for r in alone]
    with pytest.raises(InvalidRequest, match="temperature"):
        GenerationRequest.parse({"prompt": "x", "models": ["a"], "temperature": float("inf")})


def test_a_crashed_policy_actor_costs_a_stall_not_a_stream(served):
    """Kill the hosted policy's actor (as a crash) with streams deciding through it: Ray starts
    it again, the decisions in flight are asked again, every stream ends whole and logged."""
    handle, log_path, policy = served
    requests = [req(prompt=f"{PROMPT}{i} ", policy="random_switch", policy_params=HOSTED,
                    max_tokens=64) for i in range(4)]  # fmt: skip
    local = [handle.generate.remote(r.model_copy(update={"request_id": f"{r.request_id}-x"}))
             for r in requests]  # fmt: skip
    expected = [r.result() for r in local]
    streams = [handle.options(stream=True).stream.remote(r) for r in requests]
    firsts = [next(s) for s in streams]  # every stream is under way
    ray.kill(policy, no_restart=False)
    events = [[first, *s] for first, s in zip(firsts, streams, strict=True)]
    for got, want in zip(events, expected, strict=True):
        assert isinstance(got[-1], FinishEvent)
        assert "".join(e.text for e in got[:-1]) == want.text  # seeded: the same choices
    assert handle.health.remote().result() == {}
    handle.flush_turn_log.remote().result()
    logged = {rec.request_id for rec, _ in TurnLogReader(log_path) if isinstance(rec, TurnRecord)}
    assert {r.request_id for r in requests} <= logged
