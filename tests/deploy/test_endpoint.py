"""A black-box model behind an OpenAI-compatible completions endpoint (`CompletionsModel`).

Without a server: the config of an endpoint model, its sessions (held here), what it refuses
(scoring, sampling options an endpoint cannot take), a missing key, and endpoints that refuse
the connection or never answer (real sockets). Against the suite's real antiphon HTTP server
as the endpoint (slow): the adapter writes what the endpoint writes, seed for seed, with its
log-probs, stop strings and usage; bad requests quote the endpoint; and the model joins
ensembles: beside an in-process engine in a `Coordinator` (round robin, and a weak-to-strong
search it proposes for), and in a served app built by `build_app`, answering over HTTP.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from antiphon.actors.endpoint import CompletionsModel, local_logprobs
from antiphon.actors.engine import ModelEngine
from antiphon.actors.protocol import SessionModel
from antiphon.checkpoint import load_tokenizer, tokenizer_fingerprint
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.deploy.app import build_app, free_port, turn_log_actor_name_for
from antiphon.deploy.config import parse_config
from antiphon.errors import ConfigError, InvalidRequest, SessionLost, Unreachable
from antiphon.messages import SamplingParams
from tests.deploy.server import API_KEY, http_url
from tests.factories import make_request

KEY_ENV = "ANTIPHON_TEST_ENDPOINT_KEY"
PROMPT = "Once upon a time"


def run(coro):
    return asyncio.run(coro)


def endpoint_model(
    path, base_url: str = "http://127.0.0.1:9/v1", max_sessions: int = 256, **endpoint
) -> ModelSpec:
    """A model behind an endpoint at `base_url` (by default one nobody answers on)."""
    endpoint = {"base_url": base_url, "model": "m", **endpoint}
    return ModelSpec(name="big", path=str(path), max_sessions=max_sessions, endpoint=endpoint)


# --- config --------------------------------------------------------------------------------


def test_an_endpoint_model_takes_no_deployment_fields(tiny_model_dir):
    with pytest.raises(ValueError, match=r"'big'.*no deployment: gate_path, deployment"):
        ModelSpec(name="big", path=str(tiny_model_dir), deployment={"num_gpus": 1},
                  gate_path="/g.safetensors",
                  endpoint={"base_url": "http://h/v1", "model": "m"})  # fmt: skip
    with pytest.raises(ValueError, match="http:// or https://"):
        endpoint_model(tiny_model_dir, base_url="h:8000/v1")
    with pytest.raises(ValueError, match="api_key_env"):
        endpoint_model(tiny_model_dir, api_key_env="NOT A NAME")
    spec = endpoint_model(tiny_model_dir, base_url="https://h/v1/")
    assert spec.endpoint.base_url == "https://h/v1" and spec.endpoint.timeout_s == 60.0


def test_the_yaml_config_takes_an_endpoint_model_and_refuses_it_as_a_deployment(tmp_path):
    models = [
        {"name": "a", "path": "zoo:base"},
        {"name": "big", "path": "zoo:strong", "endpoint": {
            "base_url": "http://big-host:8000/v1", "model": "strong", "api_key_env": "BIG_KEY"}},
    ]  # fmt: skip
    ensembles = [{"name": "pair", "models": ["big", "a"]}]
    config = parse_config({"models": models, "ensembles": ensembles})
    assert config.model("big").endpoint.model == "strong"
    with pytest.raises(ConfigError, match=r"models\.1: .*deployment do not apply"):
        parse_config({"models": [models[0], {**models[1], "deployment": {"num_replicas": 2}}],
                      "ensembles": ensembles})  # fmt: skip
    switched = [{"name": "s", "models": ["a"], "policy": {"name": "switch", "params": {
        "switcher_path": "zoo:switcher", "switcher_deployment": "big"}}}]  # fmt: skip
    with pytest.raises(ConfigError, match="'big', which is reached through its endpoint"):
        parse_config({"models": models, "ensembles": switched})


def test_the_context_is_the_checkpoints_unless_given(tiny_model_dir, tmp_path):
    assert CompletionsModel(endpoint_model(tiny_model_dir)).max_context == 512
    assert CompletionsModel(endpoint_model(tiny_model_dir, max_context=64)).max_context == 64
    only_tokenizer = tmp_path / "tokenizer"
    load_tokenizer(str(tiny_model_dir)).save_pretrained(only_tokenizer)
    with pytest.raises(InvalidRequest, match="set endpoint.max_context"):
        CompletionsModel(endpoint_model(only_tokenizer))


# --- without an endpoint: sessions, refusals, failures ---------------------------------------


def test_sessions_are_held_here_and_fork_append_truncate_close(tiny_model_dir):
    big = CompletionsModel(endpoint_model(tiny_model_dir))
    tok = big.tokenizer
    prompt = list(tok(PROMPT)["input_ids"])
    more = list(tok(", a fox", add_special_tokens=False)["input_ids"])

    async def go():
        s = await big.open(PROMPT)
        assert s.length == len(prompt)
        assert (await big.append(s.session_id, more)).length == len(prompt + more)
        whole, head = await big.fork(s.session_id, 1), await big.fork(s.session_id, 2, 3)
        assert big.sessions[whole[0]].ids == prompt + more
        assert [big.sessions[h].ids for h in head] == [prompt[:3]] * 2
        assert (await big.truncate(s.session_id, 2)).length == 2
        assert big.sessions[s.session_id].ids == prompt[:2] and len(head) == 2
        with pytest.raises(InvalidRequest, match="cannot fork .* at 99 tokens: it has 2"):
            await big.fork(s.session_id, 1, 99)
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            await big.append(s.session_id, [10_000])
        await big.close(s.session_id)
        await big.close(s.session_id)  # closing an unknown session is not an error
        with pytest.raises(SessionLost, match="unknown session"):
            await big.append(s.session_id, more)

    run(go())


def test_a_full_session_table_forgets_the_least_recently_used(tiny_model_dir):
    big = CompletionsModel(endpoint_model(tiny_model_dir, max_sessions=2))

    async def go():
        first, second = (await big.open(PROMPT)).session_id, (await big.open(PROMPT)).session_id
        await big.append(first, [5])  # first is now the more recently used
        await big.open(PROMPT)
        assert first in big.sessions and second not in big.sessions

    run(go())


def test_it_cannot_score_and_says_so(tiny_model_dir):
    big = CompletionsModel(endpoint_model(tiny_model_dir))

    async def go():
        s = (await big.open(PROMPT)).session_id
        calls = [
            big.score(s, [5, 6]),
            big.score(s, [5], keep=True),
            big.teacher_force(s, [5]),
            big.next_token_logprobs(s, [5]),
            big.prompt_next_token_logprobs(PROMPT, [5]),
        ]
        for call in calls:
            with pytest.raises(InvalidRequest, match="black box .* no log-probs .* not to score"):
                await call

    run(go())


def test_sampling_options_an_endpoint_cannot_take_are_refused_not_dropped(tiny_model_dir):
    big = CompletionsModel(endpoint_model(tiny_model_dir))
    for options, named in [({"gate_threshold": 0.5}, "gate_threshold"),
                           ({"stop_token_ids": (3,)}, "stop_token_ids"),
                           ({"logprobs_top_k": 2}, "logprobs_top_k")]:  # fmt: skip
        with pytest.raises(InvalidRequest, match=f"takes no {named}"):
            run(big.generate(None, SamplingParams(**options), [5, 6]))


def test_its_fingerprint_is_never_the_local_tokenizers(tiny_model_dir):
    big = CompletionsModel(endpoint_model(tiny_model_dir))
    assert isinstance(big, SessionModel)
    info = run(big.info())
    local = load_tokenizer(str(tiny_model_dir))
    assert info.tokenizer_fingerprint.startswith("endpoint:")
    assert info.tokenizer_fingerprint != tokenizer_fingerprint(local)
    assert info.vocab_size == len(local) and info.eos_token_ids == (local.eos_token_id,)
    other = run(CompletionsModel(endpoint_model(tiny_model_dir, model="m2")).info())
    assert other.tokenizer_fingerprint != info.tokenizer_fingerprint


def test_a_key_variable_that_is_not_set_is_named(tiny_model_dir, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(InvalidRequest, match=f"{KEY_ENV} .*is not set"):
        CompletionsModel(endpoint_model(tiny_model_dir, api_key_env=KEY_ENV))


def test_an_endpoint_nobody_listens_on_fails_at_once(tiny_model_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"
    big = CompletionsModel(endpoint_model(tiny_model_dir, base_url=url, timeout_s=30))
    t0 = time.monotonic()
    with pytest.raises(Unreachable, match="'big' .*endpoint cannot be reached") as caught:
        run(big.generate(None, SamplingParams(), [5, 6]))
    assert time.monotonic() - t0 < 5
    assert "127.0.0.1" not in caught.value.message  # the address is the log's, not the client's


def test_an_endpoint_that_never_answers_times_out(tiny_model_dir):
    """A real TCP server that takes the request and says nothing: the call ends at
    timeout_s."""

    async def go():
        async def hold(reader, writer):
            await reader.read(1 << 16)
            await asyncio.sleep(30)

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        big = CompletionsModel(endpoint_model(tiny_model_dir, base_url=f"http://127.0.0.1:{port}/v1",
                                              timeout_s=0.5))  # fmt: skip
        t0 = time.monotonic()
        try:
            with pytest.raises(Unreachable, match="did not answer within 0.5 s"):
                await big.generate(None, SamplingParams(), [5, 6])
        finally:
            server.close()
        return time.monotonic() - t0

    assert run(go()) < 5


def test_the_endpoints_log_probs_go_to_the_local_tokens_their_text_ends_in():
    """Pure: (piece, log-prob) pairs of the endpoint onto local tokens ending at `ends`."""
    # "ab" + "c" read as "a", "b", "c": "ab" ends in "b"; a stretch both share keeps its sum
    assert local_logprobs([("ab", -1.0), ("c", -2.0)], "abc", [1, 2, 3], eos=False) == [
        0.0, -1.0, -2.0]  # fmt: skip
    # "a" + "bc" read as "ab", "c": "a" and "bc" end in different tokens
    assert local_logprobs([("a", -1.0), ("bc", -2.0)], "abc", [2, 3], eos=False) == [-1.0, -2.0]
    # the endpoint's end token (an empty piece after the text) is ours
    assert local_logprobs([("a", -1.0), ("", -0.5)], "a", [1], eos=True) == [-1.0, -0.5]
    # pieces that do not spell the text (byte pieces): the text's log p, spread evenly
    assert local_logprobs([("x", -1.0), ("y", -3.0)], "ab", [1, 2], eos=False) == [-2.0, -2.0]
    # none given: unknown, 0.0 (never NaN: turn records are JSON)
    assert local_logprobs(None, "ab", [1, 2], eos=True) == [0.0, 0.0, 0.0]


# --- against the suite's antiphon server ------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint_spec(server, tiny_model_dir):
    """The test server's "solo" ensemble (its model a writing alone) as a black box, read
    with a's own tokenizer."""
    return ModelSpec(
        name="big", path=str(tiny_model_dir),
        endpoint={"base_url": f"{server.url}/v1", "model": "solo", "api_key_env": KEY_ENV},
    )  # fmt: skip


@pytest.fixture()
def big(endpoint_spec, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    return CompletionsModel(endpoint_spec)


@pytest.fixture(scope="module")
def direct(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.mark.slow
def test_it_writes_what_the_endpoint_writes_seed_for_seed(big, direct):
    want = direct.completions.create(model="solo", prompt=PROMPT, max_tokens=8, temperature=1.0,
                                     seed=7, logprobs=0)  # fmt: skip
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)

    async def go():
        s = await big.open(PROMPT)
        return s, await big.generate(s.session_id, params)

    s, g = run(go())
    tok = big.tokenizer
    assert g.text == want.choices[0].text and g.text
    assert list(g.token_ids) == tok(g.text, add_special_tokens=False)["input_ids"]
    # one tokenizer on both sides: each token's log-prob is the endpoint's, as it said
    assert g.logprobs == pytest.approx(want.choices[0].logprobs.token_logprobs)
    assert g.length == s.length + len(g.token_ids) and g.finish_reason == "length"
    assert big.tokens_sampled == want.usage.completion_tokens == 8
    assert big.tokens_prompted == want.usage.prompt_tokens


@pytest.mark.slow
def test_a_stop_string_cuts_the_text_and_ends_with_stop(big, direct):
    free = direct.completions.create(model="solo", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                     seed=3).choices[0].text  # fmt: skip
    stop = free[6:8]  # written in the middle: the same seed writes it again, and stops there
    cut = free[: free.index(stop)]
    g = run(big.generate(None, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3,
                                              stop_strings=(stop,)),
                         list(big.tokenizer(PROMPT)["input_ids"])))  # fmt: skip
    assert (g.text, g.finish_reason) == (cut, "stop")
    want = big.tokenizer(cut, add_special_tokens=False)["input_ids"]
    assert list(g.token_ids) == want and len(g.logprobs) == len(want)


@pytest.mark.slow
def test_the_endpoints_refusals_are_quoted(endpoint_spec, monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    unknown = endpoint_spec.model_copy(update={"endpoint": endpoint_spec.endpoint.model_copy(
        update={"model": "no-such-ensemble"})})  # fmt: skip
    with pytest.raises(InvalidRequest, match="'big' .*answered 404: unknown ensemble 'no-such-"):
        run(CompletionsModel(unknown).generate(None, SamplingParams(), [5, 6]))
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    with pytest.raises(InvalidRequest, match="answered 401.*check the key endpoint.api_key_env"):
        run(CompletionsModel(endpoint_spec).generate(None, SamplingParams(), [5, 6]))


@pytest.mark.slow
def test_it_takes_turns_with_an_in_process_engine(big, tiny_model_dir):
    """Round robin over the endpoint and an engine of the same checkpoint: the engine reads
    the endpoint's text re-tokenized (another fingerprint), the endpoint the engine's text."""
    engine = ModelEngine(ModelSpec(name="a", path=str(tiny_model_dir)))
    tok = load_tokenizer(str(tiny_model_dir))
    coord = Coordinator({"big": big, "a": engine}, {"big": tok, "a": tok})
    request = make_request(prompt=PROMPT, models=("big", "a"), policy="round_robin",
                           policy_params={"segment_len": 3}, max_tokens=9, seed=2)  # fmt: skip

    async def go():
        try:
            return await coord.generate(request)
        finally:
            await engine.shutdown()

    result = run(go())
    assert [s.model for s in result.segments] == ["big", "a", "big"]
    assert all(len(s.token_ids) == 3 for s in result.segments)
    assert result.text == "".join(s.text for s in result.segments)
    assert big.tokens_sampled == 6  # its two segments' tokens, as the endpoint counted them
    assert not big.sessions  # the request's sessions closed at its end


@pytest.mark.slow
def test_a_search_steers_the_black_box_with_local_guides(big, tiny_model_dir,
                                                          other_tiny_model_dir):  # fmt: skip
    """The endpoint proposes (W*K completions at once, past the server's limit of two: a
    refused one is asked again), two local engines score its text; the committed response is
    the endpoint's, chunk by chunk."""
    guides = {"t": ModelEngine(ModelSpec(name="t", path=str(tiny_model_dir))),
              "u": ModelEngine(ModelSpec(name="u", path=str(other_tiny_model_dir)))}  # fmt: skip
    models = {"big": big, **guides}
    coord = Coordinator(models, {n: load_tokenizer(str(tiny_model_dir)) for n in models})
    params = {"proposer": "big", "tuned": "t", "untuned": "u", "width": 2, "successors": 2,
              "chunk_len": 4}  # fmt: skip
    request = make_request(prompt=PROMPT, models=("big", "t", "u"), policy="w2s_search",
                           policy_params=params, max_tokens=12, seed=5,
                           temperature=1.0)  # fmt: skip

    async def go():
        try:
            return await coord.generate(request)
        finally:
            for e in guides.values():
                await e.shutdown()

    result = run(go())
    assert result.text and {s.model for s in result.segments} == {"big"}
    assert all(s.kind == "search" for s in result.segments)
    assert big.tokens_sampled >= 4 * 4  # W*K first chunks at least, all sampled by the endpoint
    assert not big.sessions  # every beam's session closed


@pytest.mark.slow
def test_a_served_app_with_an_endpoint_member_answers_over_http(server, tiny_model_dir,
                                                                 tmp_path):  # fmt: skip
    """The app's "big" is reached over HTTP through the app's own keyless completions
    endpoint (its ensemble "plain": model a alone; a key would have to be set where the
    coordinator replica runs), takes turns with a deployed model, and gets no deployment:
    the health check names none missing."""
    url = http_url("/endpoint-app")
    config = parse_config({
        "models": [
            {"name": "big", "path": str(tiny_model_dir),
             "endpoint": {"base_url": f"{url}/v1", "model": "plain"}},
            {"name": "a", "path": str(tiny_model_dir)},
        ],
        "ensembles": [
            {"name": "mixed", "models": ["big", "a"],
             "policy": {"name": "round_robin", "params": {"segment_len": 3}}},
            {"name": "plain", "models": ["a"],
             "policy": {"name": "fixed", "params": {"model": "a"}}},
        ],
        "serving": {"turn_log_path": str(tmp_path / "turns.atl")},
    })  # fmt: skip
    serve.run(build_app(config), name="endpoint-app", route_prefix="/endpoint-app")
    try:
        body = {"model": "mixed", "prompt": PROMPT, "max_tokens": 9, "seed": 1}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        segments = r.json()["choices"][0]["antiphon_segments"]
        assert [s["model"] for s in segments] == ["big", "a", "big"]
        degraded = httpx.get(f"{url}/health", timeout=30).json().get("degraded", {})
        assert not [c for c in degraded if c.startswith("model:")], degraded
        assert "big" not in serve.status().applications["endpoint-app"].deployments
    finally:
        serve.delete("endpoint-app")
        # its turn-log actor is detached: end it with the app, as the suite's later apps
        # count the cluster's turn-log actors
        name = turn_log_actor_name_for(str((tmp_path / "turns.atl").resolve()))
        ray.kill(ray.get_actor(name, namespace="antiphon"), no_restart=True)
