"""Logits processors (bias, penalties, a grammar) alone, and in the engine against a reference
loop of plain transformers full forwards with the same arithmetic done by hand."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import torch

from antiphon.actors.engine import ModelEngine
from antiphon.actors.grammar import GrammarTokenizer, response_format_grammar
from antiphon.actors.logits import GrammarMask, LogitBias, RepetitionPenalty, logits_processors
from antiphon.actors.sampling import choose_tokens, new_generator
from antiphon.errors import InvalidRequest
from antiphon.messages import SamplingParams

BOOLEAN = response_format_grammar("json_schema", {"type": "boolean"})
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "boolean"}},
    "required": ["n", "b"],
    "additionalProperties": False,
}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def engine(spec):
    eng = ModelEngine(spec)
    yield eng
    run(eng.shutdown())


# --- the units alone ---------------------------------------------------------------------------


def test_a_logit_bias_adds_its_values_to_its_tokens_only():
    logits = torch.zeros(6)
    out = LogitBias([(1, 2.5), (4, -100.0)])(logits)
    assert out.tolist() == [0.0, 2.5, 0.0, 0.0, -100.0, 0.0]
    assert logits.tolist() == [0.0] * 6  # the input is left as it was


def test_penalties_count_the_response_and_what_is_written_after():
    penalty = RepetitionPenalty(presence=0.25, frequency=0.5, response_ids=[1, 1, 2])
    assert penalty(torch.zeros(4)).tolist() == [0.0, -1.25, -0.75, 0.0]
    penalty.accept(3)
    penalty.accept(1)
    assert penalty(torch.zeros(4)).tolist() == [0.0, -1.75, -0.75, -0.75]


def test_penalties_read_the_session_from_the_response_start_only():
    params = SamplingParams(frequency_penalty=1.0, response_start=3)
    (penalty,) = logits_processors(params, [2, 2, 2, 0, 1], grammar_for=None)
    assert penalty(torch.zeros(3)).tolist() == [-1.0, -1.0, 0.0]


def test_penalties_and_a_grammar_need_to_know_where_the_response_starts():
    with pytest.raises(InvalidRequest, match="need the response_start"):
        SamplingParams(presence_penalty=0.5)
    with pytest.raises(InvalidRequest, match=r"presence_penalty must be in \[-2, 2\]"):
        SamplingParams(presence_penalty=2.5, response_start=0)
    with pytest.raises(InvalidRequest, match=r"logit_bias of token 3 must be in \[-100, 100\]"):
        SamplingParams(logit_bias=((3, 101.0),))


def test_the_choice_reads_the_shaped_logits_and_the_logprobs_the_models_own():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    shaped = LogitBias([(0, -100.0)])(logits[0])[None]
    params = [SamplingParams()]
    tokens, logprobs, _ = choose_tokens(logits, params, [new_generator(0)], shaped)
    assert tokens == [1]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_a_grammar_mask_keeps_what_the_grammar_takes_next(reference):
    _, tokenizer = reference
    grammar = GrammarTokenizer(tokenizer, len(tokenizer))
    mask = GrammarMask(grammar.matcher(BOOLEAN, []))
    allowed = torch.isfinite(mask(torch.zeros(len(tokenizer)))).nonzero()[:, 0].tolist()
    assert sorted(tokenizer.decode([i]) for i in allowed) == ["f", "t"]
    for token in tokenizer("true", add_special_tokens=False)["input_ids"]:
        mask.accept(token)
    allowed = torch.isfinite(mask(torch.zeros(len(tokenizer)))).nonzero()[:, 0].tolist()
    assert allowed == [tokenizer.eos_token_id]  # complete: only the end


def test_a_response_that_breaks_the_grammar_is_refused(reference):
    _, tokenizer = reference
    grammar = GrammarTokenizer(tokenizer, len(tokenizer))
    ids = tokenizer("nope", add_special_tokens=False)["input_ids"]
    with pytest.raises(InvalidRequest, match="the response so far does not match it"):
        grammar.matcher(BOOLEAN, ids)


@pytest.mark.parametrize(
    ("kind", "schema", "message"),
    [
        ("json_schema", None, "'json_schema' with a schema"),
        ("xml", None, "type 'xml'"),
        ("json_schema", {"type": "no-such-type"}, "response_format"),
    ],
)
def test_a_response_format_without_a_grammar_is_refused_by_name(kind, schema, message):
    with pytest.raises(InvalidRequest, match=message):
        response_format_grammar(kind, schema)


# --- in the engine, against plain transformers -----------------------------------------------


def hand_greedy(reference, prompt_ids, n, shape) -> list[int]:
    """Greedy decoding by full forwards, each step's logits through `shape(logits, written)`."""
    model, tokenizer = reference
    ids, written = list(prompt_ids), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(torch.argmax(shape(logits, written)))
        written.append(token)
        ids.append(token)
        if token == tokenizer.eos_token_id:
            break
    return written


def generate(engine, prompt: str, **params):
    async def go():
        s = await engine.open(prompt)
        g = await engine.generate(s.session_id, SamplingParams(response_start=s.length, **params))
        await engine.close(s.session_id)
        return s, g

    return run(go())


def test_penalized_greedy_equals_the_penalties_done_by_hand(engine, reference):
    s, g = generate(engine, "The cat sat", max_new_tokens=24, ignore_eos=True,
                    presence_penalty=0.7, frequency_penalty=1.3)  # fmt: skip
    _, tokenizer = reference

    def penalize(logits, written):
        for token, count in Counter(written).items():
            logits[token] -= 1.3 * count + 0.7
        return logits

    prompt_ids = tokenizer("The cat sat")["input_ids"]
    assert list(g.token_ids) == hand_greedy(reference, prompt_ids, 24, penalize)
    _, plain = generate(engine, "The cat sat", max_new_tokens=24, ignore_eos=True)
    assert g.token_ids != plain.token_ids  # the penalties changed what was written


def test_biased_greedy_equals_the_bias_done_by_hand(engine, reference):
    _, tokenizer = reference
    _, plain = generate(engine, "Hello world", max_new_tokens=16, ignore_eos=True)
    banned = Counter(plain.token_ids).most_common(1)[0][0]
    _, g = generate(engine, "Hello world", max_new_tokens=16, ignore_eos=True,
                    logit_bias=((banned, -100.0), (7, 1.5)))  # fmt: skip

    def bias(logits, _):
        logits[banned] -= 100.0
        logits[7] += 1.5
        return logits

    prompt_ids = tokenizer("Hello world")["input_ids"]
    assert list(g.token_ids) == hand_greedy(reference, prompt_ids, 16, bias)
    assert banned not in g.token_ids


def test_constrained_greedy_equals_the_grammar_applied_by_hand(engine, reference):
    _, tokenizer = reference
    grammar = response_format_grammar("json_schema", SCHEMA)
    _, g = generate(engine, "x", max_new_tokens=40, grammar=grammar)
    matcher = GrammarTokenizer(tokenizer, len(tokenizer)).matcher(grammar, [])

    def constrain(logits, written):
        if written:
            matcher.accept(written[-1])
        return logits.masked_fill(~matcher.allowed(), float("-inf"))

    assert list(g.token_ids) == hand_greedy(reference, tokenizer("x")["input_ids"], 40, constrain)
    assert g.finish_reason == "eos"
    value = json.loads(g.text)
    assert set(value) == {"n", "b"} and 0 <= value["n"] <= 9 and isinstance(value["b"], bool)


def test_a_refused_grammar_leaves_the_session_as_it_was(engine, reference):
    _, tokenizer = reference

    async def go():
        s = await engine.open("x")
        prefix = tokenizer("nope", add_special_tokens=False)["input_ids"]
        params = SamplingParams(grammar=BOOLEAN, response_start=s.length)
        with pytest.raises(InvalidRequest, match="does not match"):
            await engine.generate(s.session_id, params, prefix)
        after = await engine.generate(s.session_id, SamplingParams(max_new_tokens=1))
        await engine.close(s.session_id)
        return s.length, after.length

    before, after = run(go())
    assert after == before + 1  # the refused prefix never went in


def test_a_logit_bias_outside_the_vocabulary_is_refused(engine):
    vocab = run(engine.info()).vocab_size
    with pytest.raises(InvalidRequest, match=rf"logit_bias\[0\].*{vocab}"):
        generate(engine, "x", logit_bias=((vocab, 1.0),))


def test_teacher_forcing_gives_each_positions_best_tokens(engine, reference):
    model, tokenizer = reference
    ids = tokenizer("The cat sat")["input_ids"]

    async def go():
        s = await engine.open(ids[:1])
        forced = await engine.teacher_force(s.session_id, ids[1:], top_k=3)
        await engine.close(s.session_id)
        return forced

    forced = run(go())
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    for row, top, best in zip(logprobs, forced.top, forced.argmax, strict=True):
        values, best_ids = torch.topk(row, 3)
        assert [t for t, _ in top] == best_ids.tolist() and top[0][0] == best
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_grammar_this_vocabulary_cannot_go_on_in_ends_the_call(engine, temperature):
    """No token can write a snowman: after the opening quote the call ends (eos), nothing is
    sampled from an empty distribution."""
    grammar = response_format_grammar("json_schema", {"type": "string", "pattern": "^☃+$"})
    _, g = generate(engine, "x", max_new_tokens=8, grammar=grammar, temperature=temperature, seed=0)
    assert g.text == '"' and g.finish_reason == "eos"
