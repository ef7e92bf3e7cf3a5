"""The model deployment on a real local Ray cluster, driven through a DeploymentHandle.

One Serve app (one replica of a tiny checkpoint with a deferral gate) serves this module;
the results are checked against a plain forward pass of the same checkpoint loaded here.

    python -m pytest tests/actors/test_server.py -q
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
import torch
from ray import serve
from transformers import AutoModelForCausalLM

from antiphon.actors.client import ServeModelClient
from antiphon.actors.gate import save_gate
from antiphon.actors.protocol import SessionModel
from antiphon.actors.server import build_model_deployment, deployment_options
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest, PromptTooLong, SessionLost
from antiphon.messages import Generation, SamplingParams

pytestmark = pytest.mark.slow

APP = "test-server"
PROMPT = [5, 17, 30, 42, 8, 61, 23]
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def spec(tiny_model_dir, tmp_path_factory) -> ModelSpec:
    # A gate that is always ~1 (zero weight, large bias): with a threshold it stops at once.
    gate_file = save_gate(
        tmp_path_factory.mktemp("gate") / "gate.safetensors", torch.zeros(64), 10.0
    )
    return ModelSpec(name="tiny", path=str(tiny_model_dir), gate_path=str(gate_file))


@pytest.fixture(scope="module")
def model(ray_cluster, spec):
    """A ServeModelClient over a one-replica deployment of the tiny checkpoint."""
    handle = serve.run(build_model_deployment(spec), name=APP, route_prefix=None)
    yield ServeModelClient(handle)
    serve.delete(APP)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm.eval()
    return lm


def run(coro):
    return asyncio.run(coro)


@torch.no_grad()
def greedy(lm, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, each from a fresh forward over the whole sequence."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(lm(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


@torch.no_grad()
def logprobs(lm, prefix: list[int], continuation: list[int]) -> list[float]:
    seq = torch.tensor([prefix + continuation])
    logp = torch.log_softmax(lm(seq).logits[0].float(), dim=-1)
    return [float(logp[len(prefix) + i - 1, t]) for i, t in enumerate(continuation)]


def test_options_come_from_the_spec(spec):
    deployment = spec.deployment.model_copy(update={"num_replicas": 3, "num_gpus": 0.5})
    options = deployment_options(spec.model_copy(update={"deployment": deployment}))
    assert options["name"] == "tiny"
    assert options["num_replicas"] == 3
    assert options["max_ongoing_requests"] == spec.deployment.max_ongoing_requests
    assert options["ray_actor_options"] == {"num_cpus": 0.0, "num_gpus": 0.5}


def test_client_is_a_session_model(model):
    assert isinstance(model, SessionModel)
    info = run(model.info())
    assert info.name == "tiny" and info.has_gate and info.max_context == 512


def test_greedy_across_calls_and_appends_equals_fresh_forward(model, reference):
    async def turns():
        s = await model.open(PROMPT)
        first = await model.generate(s.session_id, GREEDY)
        after_foreign = await model.append(s.session_id, [11, 12, 13])
        second = await model.generate(s.session_id, GREEDY)
        await model.close(s.session_id)
        return first, after_foreign, second

    first, after_foreign, second = run(turns())
    assert list(first.token_ids) == greedy(reference, PROMPT, 6)
    seq = PROMPT + list(first.token_ids) + [11, 12, 13]
    assert after_foreign.length == len(seq)
    assert list(second.token_ids) == greedy(reference, seq, 6)
    assert second.length == len(seq) + 6
    # The session's cache lived on between calls: the second turn did not reread the prompt.
    assert 0 < second.new_tokens_computed < len(PROMPT) + 3 + 6
    assert second.logprobs == pytest.approx(
        logprobs(reference, seq, list(second.token_ids)), abs=1e-4
    )


def test_one_call_turns_through_the_handle_equal_open_append_generate(model, reference):
    """generate(None, ..., prompt) opens a session; generate(sid, ..., foreign) appends and
    writes in one round trip: the same tokens as open / append / generate, no extra pass."""
    foreign = [11, 12, 13]

    async def turns():
        first = await model.generate(None, GREEDY, PROMPT)  # open + generate
        second = await model.generate(first.session_id, GREEDY, foreign)  # append + generate
        await model.close(first.session_id)
        s = await model.open(PROMPT)
        first_ref = await model.generate(s.session_id, GREEDY)
        await model.append(s.session_id, foreign)
        second_ref = await model.generate(s.session_id, GREEDY)
        await model.close(s.session_id)
        return first, second, first_ref, second_ref

    first, second, first_ref, second_ref = run(turns())
    assert first.token_ids == first_ref.token_ids
    assert list(first.token_ids) == greedy(reference, PROMPT, 6)
    seq = PROMPT + list(first.token_ids) + foreign
    assert second.token_ids == second_ref.token_ids
    assert list(second.token_ids) == greedy(reference, seq, 6)
    assert second.length == len(seq) + 6
    assert first.new_tokens_computed == len(PROMPT) + 5  # the prompt, then one per new token
    assert second.new_tokens_computed == len(foreign) + 6  # the pending token rides along


def test_score_equals_full_forward_and_leaves_session(model, reference):
    continuation = [40, 41, 42, 3, 9]

    async def go():
        s = await model.open(PROMPT)
        scores = await model.score(s.session_id, continuation)
        g = await model.generate(s.session_id, GREEDY)
        return scores, g

    scores, g = run(go())
    assert scores == pytest.approx(logprobs(reference, PROMPT, continuation), abs=1e-4)
    assert list(g.token_ids) == greedy(reference, PROMPT, 6)  # as if score never happened


def test_score_with_keep_and_fork_at_a_length_through_the_deployment(model, reference):
    """A search's guide calls over Serve: score a chunk and keep it; fork where tokens part."""
    chunk, more = [40, 41, 42], [3, 9]

    async def go():
        s = await model.open(PROMPT)
        kept = await model.score(s.session_id, chunk, keep=True)
        after = await model.score(s.session_id, more)
        (at_prompt,) = await model.fork(s.session_id, 1, len(PROMPT))
        again = await model.score(at_prompt, chunk)
        return kept, after, again

    kept, after, again = run(go())
    assert kept == pytest.approx(logprobs(reference, PROMPT, chunk), abs=1e-4)
    assert after == pytest.approx(logprobs(reference, PROMPT + chunk, more), abs=1e-4)
    assert again == pytest.approx(kept, abs=1e-4)


def test_fork_and_truncate_continue_like_fresh_sessions(model, reference):
    async def go():
        s = await model.open(PROMPT)
        await model.generate(s.session_id, GREEDY)
        children = await model.fork(s.session_id, 2)
        from_children = [await model.generate(c, GREEDY) for c in children]
        cut = await model.truncate(s.session_id, 4)
        after_cut = await model.generate(s.session_id, GREEDY)
        return children, from_children, cut, after_cut

    children, from_children, cut, after_cut = run(go())
    prefix = PROMPT + greedy(reference, PROMPT, 6)
    assert len(set(children)) == 2
    for g in from_children:
        assert list(g.token_ids) == greedy(reference, prefix, 6)
    assert cut.length == 4
    assert list(after_cut.token_ids) == greedy(reference, PROMPT[:4], 6)


def test_text_prompt_and_gate_stop(model):
    async def go():
        s = await model.open("Hello there")
        return await model.generate(
            s.session_id, SamplingParams(max_new_tokens=5, gate_threshold=0.5, ignore_eos=True)
        )

    g = run(go())
    assert isinstance(g, Generation)
    # The gate is ~1 before the first token, so nothing is written and the call says why.
    assert g.finish_reason == "gate" and g.token_ids == () and g.gates[0] > 0.99


def test_bad_inputs_raise_typed_errors_and_harm_nothing(model, reference):
    async def go():
        s = await model.open(PROMPT)
        errors = []
        for call in (
            model.append(s.session_id, [10_000]),
            model.score(s.session_id, [-1]),
            model.fork(s.session_id, 0),
            model.generate("no-such-session", GREEDY),
            model.open(list(range(10, 60)) * 12),  # 600 tokens > 512 context
        ):
            try:
                await call
            except Exception as e:  # collected to check each class below
                errors.append(e)
        return errors, await model.generate(s.session_id, GREEDY)

    errors, g = run(go())
    assert [type(e) for e in errors] == [
        InvalidRequest,
        InvalidRequest,
        InvalidRequest,
        SessionLost,
        PromptTooLong,
    ]
    assert "vocabulary" in str(errors[0]) and "no-such-session" in str(errors[3])
    assert list(g.token_ids) == greedy(reference, PROMPT, 6)


def test_health_check(model):
    model.handle.check_health.remote().result()  # the engine's check, through Serve
    status = serve.status().applications[APP].deployments["tiny"]
    assert status.status == "HEALTHY"


def test_metrics_are_exported(model, ray_cluster):
    """Serve replicas export metrics every few seconds; poll the node's Prometheus endpoint."""
    session = run(model.open(PROMPT))  # left open: live_sessions >= 1 from here on
    run(model.generate(session.session_id, GREEDY))
    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    wanted = (
        "ray_antiphon_tokens_generated",
        "ray_antiphon_live_sessions",
        "ray_antiphon_cached_tokens",
    )
    found: dict[str, float] = {}
    for _ in range(60):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        for line in body.decode().splitlines():
            name = line.split("{", 1)[0].removesuffix("_total")
            if name in wanted and f'application="{APP}"' in line and 'model="tiny"' in line:
                found[name] = float(line.rsplit(" ", 1)[1])
        # Earlier snapshots may predate this test's session (gauges at 0): wait for a later one.
        if len(found) == len(wanted) and min(found.values()) > 0:
            break
        time.sleep(1)
    assert found["ray_antiphon_tokens_generated"] > 0
    assert found["ray_antiphon_live_sessions"] >= 1
    assert found["ray_antiphon_cached_tokens"] > 0
