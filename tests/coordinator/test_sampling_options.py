"""The OpenAI sampling options through the coordinator over real engines: a grammar holds
whichever model writes (across tokenizers, and when a gate hands tokens over), a logit bias
bans a token for every writer, penalties count the response, alternatives per token."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from antiphon.actors.grammar import response_format_grammar
from antiphon.coordinator.request import GenerationRequest
from antiphon.errors import InvalidRequest
from tests.coordinator.test_decision_shapes import gate_threshold_that_fires_sometimes
from tests.coordinator.test_loop import PROMPT

# Bounded, so a random model can finish it within the budget.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def follows_schema(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"name", "age", "ok"}
        and isinstance(value["name"], str) and len(value["name"]) <= 6
        and type(value["age"]) is int and 0 <= value["age"] <= 99
        and isinstance(value["ok"], bool)
    )  # fmt: skip


def request(models: tuple[str, ...], **kw) -> GenerationRequest:
    fields = dict(
        prompt=PROMPT, models=models, policy="round_robin",
        policy_params={"segment_len": 3}, max_tokens=80,
    )  # fmt: skip
    return GenerationRequest(**{**fields, **kw})


def run(coordinator, req: GenerationRequest):
    return asyncio.run(coordinator.generate(req))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_grammar_holds_every_writer_across_tokenizers(coordinator, seed):
    grammar = response_format_grammar("json_schema", SCHEMA)
    req = request(("a", "c"), grammar=grammar, temperature=1.0, seed=seed)
    result = run(coordinator, req)
    assert {s.model for s in result.segments} == {"a", "c"}  # both wrote part of it
    assert result.finish_reason == "eos"
    assert follows_schema(result.text), result.text


def test_a_grammar_holds_the_base_and_the_assistant_it_defers_to(coordinator, engines, tokenizers):
    eta = gate_threshold_that_fires_sometimes(engines, tokenizers)
    req = GenerationRequest(
        prompt=PROMPT, models=("a_gated", "b"), policy="defer", max_tokens=80,
        policy_params={"base": "a_gated", "assistant": "b", "eta": eta},
        grammar=response_format_grammar("json_schema", SCHEMA),
    )  # fmt: skip
    result = run(coordinator, req)
    assert {s.kind for s in result.segments} == {"write", "deferred"}
    assert follows_schema(result.text), result.text


def test_json_object_opens_an_object_with_a_key(coordinator):
    result = run(coordinator, request(("a", "b"), grammar=response_format_grammar("json_object")))
    # a random model names its first key without end, so the object stays open at the budget
    assert result.text.startswith('{"') and result.finish_reason == "length"


def test_compose_refuses_what_it_cannot_apply_to_a_mixture(coordinator):
    req = GenerationRequest(
        prompt=PROMPT, models=("a_gated", "b"), policy="defer", max_tokens=8,
        policy_params={"base": "a_gated", "assistant": "b", "eta": 0.0, "strategy": "compose"},
        presence_penalty=1.0,
    )  # fmt: skip
    with pytest.raises(InvalidRequest, match="strategy 'compose'.*no penalties"):
        run(coordinator, req)


def test_a_logit_bias_bans_a_token_for_every_writer(coordinator):
    plain = run(coordinator, request(("a", "b"), max_tokens=24))
    counts = Counter(t for s in plain.segments for t in s.token_ids)
    banned = counts.most_common(1)[0][0]
    biased = run(coordinator, request(("a", "b"), max_tokens=24, logit_bias={banned: -100.0}))
    assert {s.model for s in biased.segments} == {"a", "b"}
    assert all(banned not in s.token_ids for s in biased.segments)
    forced = run(coordinator, request(("a", "b"), max_tokens=6, logit_bias={banned: 100.0}))
    assert all(set(s.token_ids) == {banned} for s in forced.segments)


def test_a_logit_bias_needs_one_vocabulary_and_ids_inside_it(coordinator, engines):
    with pytest.raises(InvalidRequest, match="logit_bias: the ensemble .* mixes tokenizers"):
        run(coordinator, request(("a", "c"), logit_bias={5: 1.0}))
    vocab = asyncio.run(engines["a"].info()).vocab_size
    with pytest.raises(InvalidRequest, match=rf"logit_bias: token ids \[{vocab}\] are outside"):
        run(coordinator, request(("a", "b"), logit_bias={vocab: 1.0}))


def test_a_frequency_penalty_counts_the_response_of_every_writer(coordinator):
    def most_repeated(**kw) -> int:
        result = run(coordinator, request(("a", "b"), max_tokens=40, **kw))
        return Counter(t for s in result.segments for t in s.token_ids).most_common(1)[0][1]

    assert most_repeated(frequency_penalty=2.0) < most_repeated()
    assert most_repeated(presence_penalty=2.0) < most_repeated()


def test_each_token_comes_with_its_writers_alternatives_best_first(coordinator):
    result = run(coordinator, request(("a", "c"), max_tokens=12, top_logprobs=3))
    for seg in result.segments:
        assert len(seg.top_logprobs) == len(seg.token_ids)
        for token, logprob, top in zip(seg.token_ids, seg.logprobs, seg.top_logprobs, strict=True):
            assert len(top) == 3
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert top[0] == (token, pytest.approx(logprob))  # greedy: the best one
