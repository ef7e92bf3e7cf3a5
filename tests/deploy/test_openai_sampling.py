"""The sampling options of the OpenAI API against the real server, through the official
`openai` client and a second client library (LangChain's `ChatOpenAI`): structured output,
logit bias, penalties, alternatives per token (written and echoed), token-id prompts."""

from __future__ import annotations

import json

import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from antiphon.deploy import api
from tests.deploy.server import API_KEY

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Hi"}]
SCHEMA = {  # bounded, so a random model finishes it within the budget
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)  # the test ensembles' models' own


def chat(oai, model="pair", **kw):
    return oai.chat.completions.create(model=model, messages=MESSAGES, **{"max_tokens": 40, **kw})


def complete(oai, prompt=PROMPT, **kw):
    return oai.completions.create(model="pair", prompt=prompt, **{"max_tokens": 8, **kw})


def follows_schema(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"name", "age"} and len(value["name"]) <= 6 and 0 <= value["age"] <= 99


@pytest.mark.parametrize("ensemble", ["pair", "switched", "deferred"])
def test_a_json_schema_answer_parses_whoever_writes_it(oai, ensemble):
    answer = chat(oai, ensemble, response_format=JSON_SCHEMA, temperature=1.0, seed=3)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop"
    assert follows_schema(choice.message.content), choice.message.content
    streamed = chat(oai, ensemble, response_format=JSON_SCHEMA, temperature=1.0, seed=3,
                    stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == choice.message.content


def test_a_response_format_the_grammar_library_cannot_take_is_a_400_naming_it(oai):
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat(oai, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "no-such-type"}}})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="json_schema is given with type"):
        chat(oai, response_format={"type": "json_schema"})
    with pytest.raises(openai.BadRequestError, match="tools: not supported by antiphon"):
        chat(oai, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_a_logit_bias_bans_a_token_and_checks_its_ids(oai, tokenizer):
    plain = complete(oai, max_tokens=16).choices[0].text
    banned = max(set(plain), key=plain.count)  # one token per character here
    banned_id = tokenizer.convert_tokens_to_ids(banned)
    biased = complete(oai, max_tokens=16, logit_bias={str(banned_id): -100})
    assert banned not in biased.choices[0].text and biased.choices[0].text != plain
    with pytest.raises(openai.BadRequestError, match="logit_bias: token ids .* outside"):
        complete(oai, logit_bias={"100000": 1})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        complete(oai, logit_bias={"5": 101})


def test_penalties_change_a_greedy_answer(oai):
    plain = complete(oai, max_tokens=24, temperature=0).choices[0].text
    assert complete(oai, max_tokens=24, temperature=0, frequency_penalty=2).choices[0].text != plain
    assert complete(oai, max_tokens=24, temperature=0, presence_penalty=2).choices[0].text != plain
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        complete(oai, presence_penalty=2.5)


def test_chat_alternatives_are_the_writers_best_tokens_streamed_or_not(oai):
    answer = chat(oai, logprobs=True, top_logprobs=3, max_tokens=10, temperature=0)
    content = answer.choices[0].logprobs.content
    assert len(content) == 10
    for token in content:
        assert len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted(
            (t.logprob for t in token.top_logprobs), reverse=True)  # fmt: skip
        assert token.top_logprobs[0].token == token.token  # greedy: the best
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
    chunks = chat(oai, logprobs=True, top_logprobs=3, max_tokens=10, temperature=0, stream=True)
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]  # fmt: skip
    # the same tokens and alternatives (log-probs equal up to batching's float noise)
    assert [[a.token for a in t.top_logprobs] for t in streamed] == [
        [a.token for a in t.top_logprobs] for t in content]  # fmt: skip
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="top_logprobs: needs logprobs=true"):
        chat(oai, top_logprobs=2)


def test_completion_alternatives_in_the_legacy_layout(oai):
    answer = complete(oai, logprobs=2, temperature=0)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.top_logprobs) == len(logprobs.tokens) == 8
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs,
                                   logprobs.top_logprobs, strict=True):  # fmt: skip
        assert 1 <= len(top) <= 2 and top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        complete(oai, logprobs=6)


def test_an_echoed_prompt_says_which_of_its_tokens_were_the_greedy_ones(oai):
    """What harnesses ask for a log-likelihood and its is-greedy flag: echo, logprobs=1,
    max_tokens=0."""
    scored = complete(oai, echo=True, logprobs=1, max_tokens=0).choices[0].logprobs
    assert scored.top_logprobs[0] is None and scored.token_logprobs[0] is None
    for token, logprob, top in zip(scored.tokens[1:], scored.token_logprobs[1:],
                                   scored.top_logprobs[1:], strict=True):  # fmt: skip
        ((best, best_logprob),) = top.items()
        assert best_logprob >= logprob - 1e-5
        assert (best == token) == (best_logprob == pytest.approx(logprob))


def test_an_echoed_prompt_is_scored_by_the_model_the_request_names(oai):
    def scored(**kw):
        answer = complete(oai, echo=True, logprobs=0, max_tokens=0, **kw)
        return answer.choices[0].logprobs

    first, named = scored(), scored(extra_body={"echo_model": "b"})
    assert set(first.antiphon_models) == {"a"} and set(named.antiphon_models) == {"b"}
    assert first.tokens == named.tokens and first.token_logprobs != named.token_logprobs
    with pytest.raises(openai.BadRequestError, match="echo_model: 'nope' is not a model"):
        scored(extra_body={"echo_model": "nope"})
    with pytest.raises(openai.BadRequestError, match="echo_model: .* only with echo"):
        complete(oai, extra_body={"echo_model": "b"})


def test_a_token_id_prompt_is_the_prompt_it_decodes_to(oai, tokenizer):
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    by_text = complete(oai, temperature=0).choices[0].text
    assert complete(oai, prompt=ids, temperature=0).choices[0].text == by_text
    batch = complete(oai, prompt=[ids, tokenizer("Hi", add_special_tokens=False)["input_ids"]],
                     temperature=0)  # fmt: skip
    assert [c.text for c in batch.choices][0] == by_text and len(batch.choices) == 2
    with pytest.raises(openai.BadRequestError, match="prompt: token ids \\[100000\\] are outside"):
        complete(oai, prompt=[1, 100000])
    with pytest.raises(openai.BadRequestError, match="token-id prompt must hold"):
        complete(oai, prompt=[ids, []])


def test_every_parameter_the_official_client_can_send_is_implemented_or_refused_or_moot():
    """Read from the installed client's own request types: a new parameter in a new release
    fails here until it is implemented, refused by name, or named as the account's."""
    import typing

    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    handled = set(api.NOT_IMPLEMENTED) | set(api.ACCOUNT_ONLY)
    for params, body in [
        (chat_create_params.CompletionCreateParamsBase, api.ChatCompletionRequest),
        (completion_create_params.CompletionCreateParamsBase, api.CompletionRequest),
    ]:
        sent = set(typing.get_type_hints(params))
        assert sent - set(body.model_fields) - handled == set()


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=99)


def test_langchain_chat_openai_answers_streams_and_parses_structured_output(server, oai):
    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, model="pair",
                     max_tokens=12, temperature=0, max_retries=0)  # fmt: skip
    reply = llm.invoke("Hi")
    assert reply.content == chat(oai, max_tokens=12, temperature=0).choices[0].message.content
    assert "".join(chunk.content for chunk in llm.stream("Hi")) == reply.content
    structured = llm.with_structured_output(Person, method="json_schema", strict=True)
    person = structured.invoke("Who is Bob?", max_tokens=60)
    assert isinstance(person, Person)
    logged = llm.bind(logprobs=True, top_logprobs=2).invoke("Hi")
    tops = [t["top_logprobs"] for t in logged.response_metadata["logprobs"]["content"]]
    assert tops and all(len(top) == 2 for top in tops)
