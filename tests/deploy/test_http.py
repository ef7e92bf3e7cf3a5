"""The HTTP API end to end: a real Serve app on a real port, two tiny random checkpoints, the
native API (plain and SSE), the official `openai` client, errors, API key, overload."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from antiphon.actors.gate import gate_fingerprint
from antiphon.client import sse_events as client_sse_events
from antiphon.deploy.api import GenerateResponse, SegmentEventBody
from antiphon.deploy.app import turn_log_actor_name_for
from antiphon.training.turn_log import (
    FeedbackRecord,
    Record,
    RequestRecord,
    TurnRecord,
    read_records,
)
from tests.deploy.server import API_KEY, APP_NAME, DEFER_ETA, MAX_CONCURRENT, RunningServer

PROMPT = "Once upon a time"


def post(server: RunningServer, path: str, body: object, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=120, **kw)


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent-events response, as they arrive."""
    return client_sse_events(response.iter_lines())


def records_when(
    server: RunningServer, ready: Callable[[list[Record]], bool], within_s: float
) -> list[Record]:
    """The turn log's records once `ready(records)` holds, or at the deadline (records are
    sent after the answer, without waiting for the disk)."""
    deadline = time.monotonic() + within_s
    while True:
        found = server.turn_log.exists()
        records = [rec for rec, _ in read_records(server.turn_log)] if found else []
        if ready(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def kill_serve_replica(deployment: str) -> None:
    """ray.kill, with no restart, the one replica of a deployment of the test app (Serve
    starts another in its place)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    [replica] = [a for a in named if f"{APP_NAME}#{deployment}#" in a["name"]]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)


class HealthWatch:
    """Polls /health in a thread while its block runs; `bodies` is every answer."""

    def __init__(self, server: RunningServer, every_s: float = 0.2) -> None:
        self.url, self.every_s = f"{server.url}/health", every_s
        self.bodies: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.bodies.append(httpx.get(self.url, timeout=30).json())
            self._stop.wait(self.every_s)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def until_ok(self, within_s: float) -> dict:
        """The first ok answer, or the last answer at the deadline."""
        deadline = time.monotonic() + within_s
        while True:
            body = httpx.get(self.url, timeout=30).json()
            if body["status"] == "ok" or time.monotonic() > deadline:
                return body
            time.sleep(self.every_s)


def test_generate_returns_text_and_segments_by_model(server):
    r = post(server, "/v1/generate", {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 12})
    assert r.status_code == 200, r.text
    answer = GenerateResponse.model_validate(r.json())
    assert answer.ensemble == "pair" and answer.policy == "round_robin"
    assert answer.text == "".join(s.text for s in answer.segments)
    # round robin, 4 tokens a segment: a, b, a, ... (a model may end early with eos)
    assert [s.model for s in answer.segments] == ["a", "b", "a"][: len(answer.segments)]
    assert [s.index for s in answer.segments] == list(range(len(answer.segments)))
    assert all(s.num_tokens <= 4 for s in answer.segments)
    assert answer.usage.completion_tokens == sum(s.num_tokens for s in answer.segments)
    assert answer.finish_reason in ("length", "eos")


def test_switch_ensemble_calls_the_switcher_deployment_of_its_config(server):
    """The switcher is a model of the same config (its own deployment); the trained test
    switcher prefers model 1, so "b" writes every segment."""
    body = {"prompt": PROMPT, "ensemble": "switched", "max_tokens": 12, "temperature": 0}
    r = post(server, "/v1/generate", body)
    assert r.status_code == 200, r.text
    answer = GenerateResponse.model_validate(r.json())
    assert answer.policy == "switch" and answer.segments
    assert {s.model for s in answer.segments} == {"b"}
    fixed = post(server, "/v1/generate", {**body, "ensemble": "pair", "policy": "fixed",
                                          "policy_params": {"model": "b"}})  # fmt: skip
    assert answer.text == fixed.json()["text"]


def test_a_search_step_over_the_served_models_answers_and_the_server_goes_on(server):
    """A chunk-level beam search step forks the proposer's session and samples its children
    concurrently from within one coordinator request; those calls once shared Serve's
    internal request id, and all but the first waited forever, with every later call."""
    body = {"prompt": PROMPT, "ensemble": "trio", "max_tokens": 12, "seed": 3,
            "policy": "w2s_search",
            "policy_params": {"proposer": "a", "tuned": "b", "untuned": "switcher",
                              "width": 2, "successors": 2, "chunk_len": 4}}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/generate", json=body, headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["segments"] and {s["model"] for s in answer["segments"]} == {"a"}
    assert {s["kind"] for s in answer["segments"]} == {"search"}
    after = post(server, "/v1/generate", {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 4})
    assert after.status_code == 200, after.text


def test_a_gate_is_named_by_its_fingerprint_in_the_model_list_and_the_turn_records(server):
    """b carries a deferral gate: /v1/models names it for every ensemble with b, the
    "deferred" ensemble defers from b to a over the served stack, and b's turn records carry
    its gate values and the same fingerprint."""
    fingerprint = gate_fingerprint(server.turn_log.parent / "gate_b.safetensors")
    cards = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]
    gates = {c["id"]: c["antiphon_gates"] for c in cards}
    assert gates == {"pair": {"b": fingerprint}, "solo": {}, "switched": {"b": fingerprint},
                     "trio": {"b": fingerprint}, "deferred": {"b": fingerprint}}  # fmt: skip
    one = httpx.get(f"{server.url}/v1/models/deferred", headers=server.headers).json()
    assert one["antiphon_gates"] == {"b": fingerprint}
    r = post(server, "/v1/generate", {"prompt": PROMPT, "ensemble": "deferred", "max_tokens": 24})
    assert r.status_code == 200, r.text
    answer = GenerateResponse.model_validate(r.json())
    assert answer.policy == "defer"
    assert {(s.model, s.kind) for s in answer.segments} == {("b", "write"), ("a", "deferred")}
    records = records_when(server, lambda rs: any(
        isinstance(x, RequestRecord) and x.request_id == answer.id for x in rs), 30)  # fmt: skip
    turns = [x for x in records if isinstance(x, TurnRecord) and x.request_id == answer.id]
    assert [t.model for t in turns] == [s.model for s in answer.segments]
    for t in turns:
        if t.model == "b":
            assert t.gate == fingerprint
            assert len(t.gates) == len(t.token_ids) + (t.model_finish == "gate")
            assert all(g < DEFER_ETA for g in t.gates[: len(t.token_ids)])
        else:
            assert t.gate == "" and t.gates == () and t.segment_kind == "deferred"


def test_generate_stream_is_one_event_per_segment_then_done(server):
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 12}
    whole = GenerateResponse.model_validate(post(server, "/v1/generate", body).json())
    with httpx.stream("POST", f"{server.url}/v1/generate", json={**body, "stream": True},
                      headers=server.headers, timeout=120) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    kinds = [e for e, _ in events]
    assert kinds == ["segment"] * (len(events) - 1) + ["done"]
    segments = [SegmentEventBody.model_validate_json(d) for _, d in events[:-1]]
    done = GenerateResponse.model_validate_json(events[-1][1])
    assert [s.model for s in segments] == [s.model for s in done.segments]
    assert {s.id for s in segments} == {done.id}
    # greedy: the streamed answer is the same answer
    assert done.text == "".join(s.text for s in segments) == whole.text
    assert [s.model for s in done.segments] == [s.model for s in whole.segments]


def test_generate_from_chat_messages_and_policy_override(server):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "ensemble": "pair",
        "policy": "fixed",
        "policy_params": {"model": "b", "segment_len": 5},
        "max_tokens": 10,
    }
    r = post(server, "/v1/generate", body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["policy"] == "fixed"
    assert {s["model"] for s in answer["segments"]} == {"b"}


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_openai_models_lists_the_ensembles(oai):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["pair", "solo", "switched", "trio", "deferred"]
    assert models.data[0].model_extra["antiphon_models"] == ["a", "b"]


def test_openai_completion_with_segments(oai):
    c = oai.completions.create(model="pair", prompt=PROMPT, max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.model == "pair"
    segments = c.choices[0].model_extra["antiphon_segments"]
    assert c.choices[0].text == "".join(s["text"] for s in segments)
    assert [s["model"] for s in segments] == ["a", "b"][: len(segments)]
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.completion_tokens == sum(s["num_tokens"] for s in segments)


def test_openai_completion_stream_matches_non_stream(oai):
    whole = oai.completions.create(model="pair", prompt=PROMPT, max_tokens=8)
    chunks = list(oai.completions.create(model="pair", prompt=PROMPT, max_tokens=8, stream=True))
    text = "".join(ch.choices[0].text for ch in chunks)
    assert text == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    writers = [s["model"] for ch in chunks for s in ch.choices[0].model_extra["antiphon_segments"]]
    assert writers == [s["model"] for s in whole.choices[0].model_extra["antiphon_segments"]]


def test_openai_chat_and_chat_stream(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = oai.chat.completions.create(model="pair", messages=messages, max_tokens=8)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    content = chat.choices[0].message.content
    segments = chat.choices[0].model_extra["antiphon_segments"]
    assert content == "".join(s["text"] for s in segments)
    stream = oai.chat.completions.create(model="pair", messages=messages, max_tokens=8, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)


def test_openai_client_errors_are_typed(oai):
    with pytest.raises(openai.NotFoundError, match="unknown ensemble 'nope'"):
        oai.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.completions.create(model="pair", prompt=PROMPT, max_tokens=0)
    unauthenticated = openai.OpenAI(base_url=oai.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthenticated.models.list()


MESSAGES = [{"role": "user", "content": "Hi"}]
NOT_IMPLEMENTED = [  # (endpoint, what the official client sends, the parameter named)
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     "tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"suffix": " end"}, "suffix"),
]  # fmt: skip


def openai_create(oai: openai.OpenAI, endpoint: str, **kw):
    kw = {"max_tokens": 4, **kw}
    if endpoint == "chat":
        return oai.chat.completions.create(model="pair", messages=MESSAGES, **kw)
    return oai.completions.create(model="pair", prompt=PROMPT, **kw)


def writers_by_token(choice) -> list[str]:
    return [s["model"] for s in choice.model_extra["antiphon_segments"]
            for _ in range(s["num_tokens"])]  # fmt: skip


def test_chat_logprobs_name_each_token_and_its_writer_streamed_or_not(oai):
    chat = openai_create(oai, "chat", logprobs=True, max_tokens=12)
    choice = chat.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)
    assert [t.model_extra["antiphon_model"] for t in content] == writers_by_token(choice)
    assert set(writers_by_token(choice)) == {"a", "b"}  # round robin: both wrote
    chunks = list(openai_create(oai, "chat", logprobs=True, max_tokens=12, stream=True))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    # the same tokens, scored in another batch: equal up to float noise
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    assert openai_create(oai, "chat").choices[0].logprobs is None  # not asked, not sent


def test_completion_logprobs_in_the_legacy_layout_with_offsets_and_writers(oai):
    text = openai_create(oai, "completions", logprobs=0, max_tokens=12)
    choice = text.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == len(lp.tokens)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.model_extra["antiphon_models"] == writers_by_token(choice)
    chunks = list(openai_create(oai, "completions", logprobs=0, max_tokens=12, stream=True))
    offsets = [o for c in chunks if c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]  # fmt: skip
    assert offsets == lp.text_offset  # a chunk's tokens start where the chunks before ended


def test_echo_with_no_tokens_scores_the_prompt_under_the_first_model(oai, server):
    """What evaluation harnesses ask for a log-likelihood: the prompt's log-probs, each
    token's given those before it, under the ensemble's first model (here "a")."""
    text = "Once upon a time, a fox"
    got = oai.completions.create(model="pair", prompt=text, max_tokens=0, echo=True, logprobs=0)
    choice = got.choices[0]
    assert choice.text == text and got.usage.completion_tokens == 0
    lp = choice.logprobs
    assert "".join(lp.tokens) == text and lp.token_logprobs[0] is None
    assert set(lp.model_extra["antiphon_models"]) == {"a"}
    model_a = server.config.model("a").path
    model = AutoModelForCausalLM.from_pretrained(model_a)
    ids = AutoTokenizer.from_pretrained(model_a)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits.log_softmax(-1)[0]
    expected = [float(logits[i - 1, ids[0, i]]) for i in range(1, ids.shape[1])]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert got.usage.prompt_tokens == ids.shape[1]


def test_echo_puts_the_prompt_before_the_completion_and_its_logprobs_first(oai):
    plain = openai_create(oai, "completions", temperature=0, logprobs=0, max_tokens=6)
    echoed = openai_create(oai, "completions", temperature=0, logprobs=0, max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    tokens = echoed.choices[0].logprobs.tokens
    assert "".join(tokens) == echoed.choices[0].text
    assert tokens[-len(plain.choices[0].logprobs.tokens) :] == plain.choices[0].logprobs.tokens
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0 asks for no completion"):
        openai_create(oai, "completions", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="echo: not supported by antiphon with stream"):
        openai_create(oai, "completions", echo=True, stream=True)


@pytest.mark.parametrize(("endpoint", "params", "name"), NOT_IMPLEMENTED)
def test_an_openai_parameter_not_implemented_is_refused_by_name(oai, endpoint, params, name):
    with pytest.raises(openai.BadRequestError, match=f"{name}: not supported by antiphon"):
        openai_create(oai, endpoint, **params)


def test_openai_parameters_that_ask_for_nothing_or_only_concern_the_account_are_taken(oai):
    plain = openai_create(oai, "chat")
    asked_nothing = openai_create(
        oai, "chat", logprobs=False, presence_penalty=0, frequency_penalty=0.0,
        logit_bias={}, response_format={"type": "text"}, tool_choice="none",
        user="someone", metadata={"team": "a"}, store=False, service_tier="auto",
    )  # fmt: skip
    assert asked_nothing.choices[0].message.content == plain.choices[0].message.content
    text = openai_create(oai, "completions", echo=False, best_of=1, suffix="")
    assert text.choices[0].text == openai_create(oai, "completions").choices[0].text


def test_a_stream_sends_its_usage_in_one_more_chunk_only_when_asked(oai):
    whole = openai_create(oai, "chat")
    asked = list(openai_create(oai, "chat", stream=True, stream_options={"include_usage": True}))
    *answer, last = asked
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert all(chunk.usage is None for chunk in answer)
    assert "".join(c.choices[0].delta.content or "" for c in answer) == (
        whole.choices[0].message.content
    )
    unasked = list(openai_create(oai, "completions", stream=True))
    assert all(chunk.usage is None and chunk.choices for chunk in unasked)


def test_n_samples_are_independent_choices_seeded_from_the_request_and_their_index(oai, server):
    kw = {"temperature": 1.0, "seed": 11, "max_tokens": 12}
    one = openai_create(oai, "completions", **kw)
    two = openai_create(oai, "completions", n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == one.choices[0].text  # choice 0 keeps the request's seed
    assert two.choices[1].text != two.choices[0].text  # choice 1 a seed of its own
    again = openai_create(oai, "completions", n=2, **kw)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    assert two.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert two.usage.completion_tokens == sum(
        sum(s["num_tokens"] for s in c.model_extra["antiphon_segments"]) for c in two.choices
    )
    # each choice is a request of its own in the turn log: feedback reaches it by id-k
    r = post(server, "/v1/feedback", {"request_id": f"{two.id}-1", "reward": 1.0})
    assert r.status_code == 200, r.text


def test_a_list_prompt_is_a_batch_of_completions(oai):
    prompts = [PROMPT, "The capital of"]
    batch = oai.completions.create(model="pair", prompt=prompts, max_tokens=8, temperature=0)
    alone = [oai.completions.create(model="pair", prompt=p, max_tokens=8, temperature=0)
             for p in prompts]  # fmt: skip
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_streamed_choices_interleave_each_in_order_and_end_with_one_usage_chunk(oai):
    kw = {"temperature": 1.0, "seed": 5, "max_tokens": 12, "n": 2}
    whole = oai.chat.completions.create(model="pair", messages=MESSAGES, **kw)
    *chunks, usage = list(oai.chat.completions.create(
        model="pair", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, **kw))  # fmt: skip
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason is not None
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()


def test_more_choices_than_the_server_runs_at_once_is_refused_by_name(oai):
    with pytest.raises(openai.BadRequestError, match="serving.max_concurrent_requests"):
        openai_create(oai, "chat", n=MAX_CONCURRENT + 1)
    with pytest.raises(openai.BadRequestError, match="at most 16 per request"):
        oai.completions.create(model="pair", prompt=[PROMPT] * 9, n=2, max_tokens=2)


def test_a_model_is_retrieved_by_its_id(oai):
    card = oai.models.retrieve("pair")
    assert card.id == "pair" and card.model_extra["antiphon_models"] == ["a", "b"]
    with pytest.raises(openai.NotFoundError, match="unknown ensemble 'nope'"):
        oai.models.retrieve("nope")


def test_top_p_zero_keeps_only_the_most_likely_token(oai):
    greedy = openai_create(oai, "completions", temperature=0, max_tokens=16)
    hot = openai_create(oai, "completions", temperature=1.5, top_p=0, seed=7, max_tokens=16)
    assert hot.choices[0].text == greedy.choices[0].text


TOO_LONG = "x" * 600  # the tiny models' context is 512

CLIENT_MISTAKES = [
    # (name, path, body (str: sent raw), status, words the error message contains)
    ("malformed json", "/v1/generate", '{"prompt": "a",', 400, "malformed JSON"),
    ("not an object", "/v1/generate", "[1, 2]", 400, "must be a JSON object"),
    ("unknown ensemble", "/v1/generate", {"prompt": "a", "ensemble": "zzz"}, 404, "zzz"),
    ("unknown policy", "/v1/generate", {"prompt": "a", "policy": "zzz"}, 404, "unknown policy"),
    ("bad policy params", "/v1/generate",
     {"prompt": "a", "policy_params": {"segment_len": -1}}, 400, "segment_len"),
    ("policy names foreign model", "/v1/generate",
     {"prompt": "a", "policy": "fixed", "policy_params": {"model": "zz"}}, 400, "'zz'"),
    ("zero max_tokens", "/v1/generate", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("negative temperature", "/v1/generate", {"prompt": "a", "temperature": -1}, 400,
     "temperature"),
    ("top_p above 1", "/v1/generate", {"prompt": "a", "top_p": 2}, 400, "top_p"),
    ("infinite temperature", "/v1/generate", '{"prompt": "a", "temperature": Infinity}', 400,
     "temperature"),
    ("openai infinite temperature", "/v1/completions",
     '{"model": "pair", "prompt": "a", "temperature": Infinity}', 400, "temperature"),
    ("wrong type", "/v1/generate", {"prompt": 5}, 400, "prompt"),
    ("unknown field", "/v1/generate", {"prompt": "a", "tempreature": 1}, 400, "tempreature"),
    ("no prompt", "/v1/generate", {"max_tokens": 3}, 400, "prompt"),
    ("empty stop", "/v1/generate", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("prompt too long", "/v1/generate", {"prompt": TOO_LONG}, 400, "512"),
    ("stream: unknown policy", "/v1/generate",
     {"prompt": "a", "policy": "zzz", "stream": True}, 404, "unknown policy"),
    ("stream: prompt too long", "/v1/generate",
     {"prompt": TOO_LONG, "stream": True}, 400, "512"),
    ("openai unknown model", "/v1/completions", {"model": "zzz", "prompt": "a"}, 404, "zzz"),
    ("openai missing model", "/v1/completions", {"prompt": "a"}, 400, "model"),
    ("openai bad role", "/v1/chat/completions",
     {"model": "pair", "messages": [{"role": "robot", "content": "a"}]}, 400, "role"),
    ("openai empty messages", "/v1/chat/completions",
     {"model": "pair", "messages": []}, 400, "messages"),
    ("openai stream too long", "/v1/completions",
     {"model": "pair", "prompt": TOO_LONG, "stream": True}, 400, "512"),
    ("feedback without id", "/v1/feedback", {"reward": 1.0}, 400, "request_id"),
    ("feedback bad reward", "/v1/feedback", {"request_id": "r", "reward": "good"}, 400, "reward"),
    ("feedback for no request", "/v1/feedback", {"request_id": "never-served", "reward": 1.0},
     404, "no request with id 'never-served' in the turn log"),
    ("unknown route", "/v1/nothing", {}, 404, "Not Found"),
    # text that is not valid Unicode (JSON allows lone surrogate escapes): 400, not 500
    ("lone surrogate prompt", "/v1/generate", '{"prompt": "a\\ud800b"}', 400, "lone surrogate"),
    ("lone surrogate stream", "/v1/completions",
     '{"model": "pair", "prompt": "\\udfff", "stream": true}', 400, "prompt: lone surrogate"),
    ("lone surrogate chat", "/v1/chat/completions",
     '{"model": "pair", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400,
     "messages.0.content: lone surrogate"),
    ("lone surrogate stop", "/v1/generate", '{"prompt": "a", "stop": ["\\udc00"]}', 400,
     "stop.0: lone surrogate"),
    ("lone surrogate feedback id", "/v1/feedback", '{"request_id": "\\ud800", "reward": 1}',
     400, "request_id: lone surrogate"),
    # numbers the turn log cannot hold: 400, not a record dropped
    ("seed above 64 bits", "/v1/generate", {"prompt": "a", "seed": 2**64}, 400,
     "seed: integer 18446744073709551616 outside"),
    ("policy param above 64 bits", "/v1/generate",
     {"prompt": "a", "policy": "random_switch", "policy_params": {"seed": -(2**70)}}, 400,
     "policy_params.seed: integer"),
    # sizes: refused before the work they would cost
    ("body over the limit", "/v1/generate", {"prompt": "x" * (2 << 20)}, 413, "1048576 bytes"),
    ("too many stop strings", "/v1/generate", {"prompt": "a", "stop": ["s"] * 17}, 400,
     "at most 16 stop strings"),
    ("stop string too long", "/v1/generate", {"prompt": "a", "stop": "s" * 257}, 400,
     "at most 256 characters"),
    # what a request may name comes from the config: no paths, hub ids or patterns
    ("switch with a request's path", "/v1/generate",
     {"prompt": "a", "ensemble": "switched",
      "policy_params": {"switcher_path": "../../../../etc"}}, 400, "server's config only"),
    ("switch with a hub id", "/v1/generate",
     {"prompt": "a", "policy": "switch", "policy_params": {"switcher_path": "org/model"}}, 400,
     "policy_params.switcher_path"),
    ("switch outside its ensemble", "/v1/generate", {"prompt": "a", "policy": "switch"}, 400,
     "name an ensemble configured with it"),
    ("rule router with a request's pattern", "/v1/generate",
     {"prompt": "a" * 40, "policy": "rule_router",
      "policy_params": {"default": "a", "rules": [{"pattern": "(a+)+$", "model": "b"}]}}, 400,
     "policy_params.rules"),
    ("trained router with a request's weights", "/v1/generate",
     {"prompt": "a", "policy": "trained_router", "policy_params": {"weights": "/etc"}}, 400,
     "policy_params.weights"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in CLIENT_MISTAKES],
)
def test_client_mistake_gets_4xx_naming_it_and_server_goes_on(server, path, body, status, words):
    if isinstance(body, str):
        headers = {**server.headers, "content-type": "application/json"}
        r = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"]
    assert error["type"] and "message" in error and "param" in error and "code" in error
    # the server answers the next request
    ok = post(server, "/v1/generate", {"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_a_body_over_the_limit_without_a_declared_length_is_refused_too(server):
    def chunks():  # chunked transfer: no Content-Length to refuse it by
        yield b'{"prompt": "'
        for _ in range(3):
            yield b"x" * (1 << 20)
        yield b'"}'

    headers = {**server.headers, "content-type": "application/json"}
    r = httpx.post(f"{server.url}/v1/generate", content=chunks(), headers=headers, timeout=60)
    assert r.status_code == 413, r.text
    assert "1048576 bytes" in r.json()["error"]["message"]
    assert post(server, "/v1/generate", {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_body_without_json_content_type_is_named(server):
    r = httpx.post(f"{server.url}/v1/generate", content=b'{"prompt": "a"}', timeout=60,
                   headers={**server.headers, "content-type": "text/plain"})  # fmt: skip
    assert r.status_code == 400
    assert "Content-Type: application/json" in r.json()["error"]["message"]


def test_api_key_is_enforced_but_health_is_open(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30)
        assert r.status_code == 401
        assert "API key" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models", headers=server.headers).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok", "degraded": {}}


def test_with_a_key_only_the_liveness_probe_is_open_and_no_body_is_read_first(server):
    for path in ("/docs", "/openapi.json", "/redoc", "/v1/nothing"):
        r = httpx.get(f"{server.url}{path}", timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert "API key" in r.json()["error"]["message"]
    assert httpx.get(f"{server.url}/openapi.json", headers=server.headers).status_code == 200
    # the key is checked before the body: no key and a body over the limit is a 401, not a 413
    big = {"prompt": "x" * (2 << 20)}
    assert httpx.post(f"{server.url}/v1/generate", json=big, timeout=60).status_code == 401


def turn_request_ids(records: list[Record]) -> set[str]:
    return {rec.request_id for rec in records if isinstance(rec, TurnRecord)}


def logged_request_ids(server: RunningServer, wanted: set[str], within_s: float) -> set[str]:
    """The ids among `wanted` that have turn records in the log, waiting up to `within_s`."""
    records = records_when(server, lambda rs: wanted <= turn_request_ids(rs), within_s)
    return turn_request_ids(records) & wanted


def test_a_killed_turn_log_actor_comes_back_and_no_turn_or_feedback_is_lost(server):
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 4}
    before = [post(server, "/v1/generate", body).json()["id"] for _ in range(3)]
    name = turn_log_actor_name_for(server.config.serving.turn_log_path)
    actor = ray.get_actor(name, namespace="antiphon")  # made by the first request's records
    ray.kill(actor, no_restart=False)  # as a crash: Ray may start it again
    after = [post(server, "/v1/generate", body).json()["id"] for _ in range(3)]
    r = post(server, "/v1/feedback", {"request_id": after[0], "reward": 1.0})
    assert r.status_code == 200, r.text
    assert logged_request_ids(server, {*before, *after}, within_s=60) == {*before, *after}
    feedback = [rec for rec, _ in read_records(server.turn_log)
                if isinstance(rec, FeedbackRecord) and rec.request_id == after[0]]  # fmt: skip
    assert [f.reward for f in feedback] == [1.0]


def test_health_reports_a_dead_turn_log_and_its_replacement_loses_no_turn(server):
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 4}
    assert post(server, "/v1/generate", body).status_code == 200
    name = turn_log_actor_name_for(server.config.serving.turn_log_path)
    ray.kill(ray.get_actor(name, namespace="antiphon"), no_restart=True)  # dead for good
    health = httpx.get(f"{server.url}/health", timeout=30)
    assert health.status_code == 200  # the front door lives: liveness is not readiness
    assert health.json()["status"] == "degraded"
    assert "the turn log actor" in health.json()["degraded"]["turn_log"]
    # requests are still served, and their turns land in the log a new actor writes
    ids = {post(server, "/v1/generate", body).json()["id"] for _ in range(2)}
    assert logged_request_ids(server, ids, within_s=60) == ids
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok", "degraded": {}}


def streams_through_a_kill(
    server: RunningServer, body: dict, events_before: int, kill: Callable[[], None]
) -> tuple[list[list[tuple[str, str]]], HealthWatch]:
    """A stream in every slot the server has; once each has `events_before` events, `kill()`;
    every stream read to its end while /health is polled. (The events of each stream, the
    health watch.)"""
    n_streams = MAX_CONCURRENT
    started = threading.Barrier(n_streams + 1)
    results: list[list[tuple[str, str]]] = [[] for _ in range(n_streams)]

    def stream(i: int) -> None:
        with httpx.stream("POST", f"{server.url}/v1/generate", json=body,
                          headers=server.headers, timeout=300) as r:  # fmt: skip
            for event in sse_events(r):
                results[i].append(event)
                if len(results[i]) == events_before:
                    started.wait()  # every stream is under way before the kill

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    started.wait(timeout=120)
    kill()
    with HealthWatch(server) as health:
        for t in threads:
            t.join(timeout=300)
    return results, health


@pytest.mark.slow
def test_killing_a_model_replica_loses_no_stream_in_flight(server):
    """Serve starts a new replica; the coordinator reopens the sessions it held from the
    sequence state (SessionLost) and every stream ends whole."""
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 48, "stream": True,
            "policy_params": {"segment_len": 2}}  # fmt: skip
    results, health = streams_through_a_kill(server, body, 2, lambda: kill_serve_replica("a"))
    for events in results:
        kinds = [kind for kind, _ in events]
        assert "error" not in kinds and kinds[-1] == "done", events[-1]
        done = GenerateResponse.model_validate_json(events[-1][1])
        streamed = [SegmentEventBody.model_validate_json(d) for k, d in events if k == "segment"]
        assert done.text == "".join(s.text for s in streamed)
        assert done.usage.completion_tokens == 48 or done.finish_reason == "eos"
    # while its replica was being replaced /health said so, and says ok once it is back
    assert any("model:a" in body["degraded"] for body in health.bodies), health.bodies
    assert health.until_ok(within_s=60) == {"status": "ok", "degraded": {}}


@pytest.mark.slow
def test_a_request_whose_coordinator_dies_before_answering_is_run_again(server):
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 400, "temperature": 0,
            "policy_params": {"segment_len": 1}}  # fmt: skip
    expected = post(server, "/v1/generate", body).json()
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(post(server, "/v1/generate", body)))
    caller.start()
    time.sleep(1.0)  # the request is some turns in (a whole answer takes several seconds)
    kill_serve_replica("coordinator")
    caller.join(timeout=300)
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == expected["text"]  # greedy: the second run is the same


@pytest.mark.slow
def test_streams_whose_coordinator_dies_go_on_from_what_they_had_sent(server):
    """The coordinator replica dies with every slot streaming: each stream is resumed on the
    replica Serve starts instead, after the segments it had sent; nothing is repeated or
    lost, and every segment of it has its turn record."""
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 160, "stream": True,
            "policy_params": {"segment_len": 1}}  # fmt: skip
    kill = lambda: kill_serve_replica("coordinator")  # noqa: E731
    results, health = streams_through_a_kill(server, body, 3, kill)
    assert any("coordinator" in body["degraded"] for body in health.bodies), health.bodies
    ids = set()
    for events in results:
        kinds = [kind for kind, _ in events]
        assert "error" not in kinds and kinds[-1] == "done", events[-1]
        done = GenerateResponse.model_validate_json(events[-1][1])
        streamed = [SegmentEventBody.model_validate_json(d) for k, d in events if k == "segment"]
        assert [s.index for s in streamed] == list(range(len(streamed)))  # none twice
        assert done.text == "".join(s.text for s in streamed)
        assert done.usage.completion_tokens == 160 or done.finish_reason == "eos"
        ids.add(done.id)
    records = records_when(server, lambda rs: ids <= turn_request_ids(rs), within_s=60)
    for events in results:
        done = GenerateResponse.model_validate_json(events[-1][1])
        turns = [r for r in records if isinstance(r, TurnRecord) and r.request_id == done.id]
        assert "".join(t.text for t in sorted(turns, key=lambda t: t.segment)) == done.text


def test_a_rejected_prompt_is_logged_as_a_preview_not_whole(server):
    marker = f"rejected-{uuid.uuid4().hex}"
    r = post(server, "/v1/generate", {"prompt": marker + "y" * 200_000})
    assert r.status_code == 400, r.text

    def rejected(records: list[Record]) -> list[RequestRecord]:
        return [rec for rec in records
                if isinstance(rec, RequestRecord) and rec.prompt.startswith(marker)]  # fmt: skip

    (record,) = rejected(records_when(server, rejected, within_s=60))
    assert record.error and record.finish_reason is None
    assert len(record.prompt) < 1100 and record.prompt.endswith("more characters]")
    assert len(record.error) < 1100


def test_feedback_lands_in_the_turn_log_beside_the_turns(server):
    answer = post(server, "/v1/generate", {"prompt": PROMPT, "max_tokens": 8}).json()
    r = post(server, "/v1/feedback", {"request_id": answer["id"], "reward": 0.5})
    assert r.status_code == 200, r.text
    assert r.json() == {"request_id": answer["id"], "recorded": True}
    logged = records_when(server, lambda rs: answer["id"] in turn_request_ids(rs), within_s=10)
    records = [rec for rec in logged if rec.request_id == answer["id"]]
    feedback = [rec for rec in records if isinstance(rec, FeedbackRecord)]
    assert [f.reward for f in feedback] == [0.5]
    turns = [rec for rec in records if isinstance(rec, TurnRecord)]
    assert [t.model for t in turns] == [s["model"] for s in answer["segments"]]


@pytest.mark.slow
def test_overload_gets_503_and_capacity_comes_back(server):
    # Hold every slot with long streams (one token a turn), then ask once more.
    body = {"prompt": PROMPT, "ensemble": "pair", "max_tokens": 400, "stream": True,
            "policy_params": {"segment_len": 1}}  # fmt: skip
    opened = threading.Barrier(MAX_CONCURRENT + 1)
    release = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", f"{server.url}/v1/generate", json=body,
                          headers=server.headers, timeout=300) as r:  # fmt: skip
            assert r.status_code == 200
            lines = r.iter_lines()  # kept: dropping it would close the connection
            next(lines)  # the first event is out: this request holds a slot
            opened.wait()
            release.wait()

    holders = [threading.Thread(target=hold) for _ in range(MAX_CONCURRENT)]
    for t in holders:
        t.start()
    try:
        opened.wait(timeout=120)
        r = post(server, "/v1/generate", {"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "overloaded_error"
        assert r.headers["retry-after"] == "1"
        # refused before its body is read: even one that is not JSON gets the 503
        junk = httpx.post(f"{server.url}/v1/chat/completions", content=b"\x00" * 10_000,
                          headers=server.headers, timeout=30)  # fmt: skip
        assert junk.status_code == 503 and junk.headers["retry-after"] == "1"
        # what is not generation is still answered
        assert httpx.get(f"{server.url}/v1/models", headers=server.headers).status_code == 200
    finally:
        release.set()
        for t in holders:
            t.join()
    # The closed streams free their slots once the server notices the disconnects.
    for _ in range(120):
        ok = post(server, "/v1/generate", {"prompt": "a", "max_tokens": 2})
        if ok.status_code != 503:
            break
        time.sleep(0.5)
    assert ok.status_code == 200, ok.text
