"""The world and the corpora are pure functions of their seed, and split the entities as
designed: instruction data states facts of the SFT minority only."""

from __future__ import annotations

import random
import re

import pytest

from antiphon.errors import NotFound
from antiphon.zoo import NAMES, corpora, path
from antiphon.zoo.tokenizer import QA_CHAT_TEMPLATE, build_alt_tokenizer, build_char_tokenizer
from antiphon.zoo.world import FORBIDDEN_VERBS, LOOKALIKE_REQUESTS, make_world


def test_world_is_deterministic_under_its_seed():
    assert make_world(seed=3, n_entities=50) == make_world(seed=3, n_entities=50)
    assert make_world(seed=3, n_entities=50) != make_world(seed=4, n_entities=50)


def test_world_names_are_distinct_and_split():
    w = make_world(seed=0, n_entities=90)
    names = (
        [e.name for e in w.entities]
        + [e.capital for e in w.entities]
        + [e.founder for e in w.entities]
    )
    assert len(set(names)) == len(names)
    assert len(w.sft_entities) == 30 and len(w.held_out_entities) == 60


def test_corpora_are_deterministic():
    w = make_world(seed=0, n_entities=30)
    assert corpora.pretraining_documents(w, 20, seed=1) == corpora.pretraining_documents(
        w, 20, seed=1
    )
    assert corpora.pretraining_documents(w, 20, seed=1) != corpora.pretraining_documents(
        w, 20, seed=2
    )
    assert corpora.sft_examples(w, 50, seed=0) == corpora.sft_examples(w, 50, seed=0)
    assert corpora.preference_pairs(w, 50, seed=0) == corpora.preference_pairs(w, 50, seed=0)


def test_sft_data_states_facts_of_the_minority_only():
    w = make_world(seed=0, n_entities=30)
    held_out_values = {e.capital for e in w.held_out_entities} | {
        e.founder for e in w.held_out_entities
    }
    examples = corpora.sft_examples(w, 2000, seed=0)
    for q, a in examples:
        assert not any(v in a for v in held_out_values), (q, a)
    # a question may name a held-out value only to ask whether it is right
    naming = [q for q, _ in examples if any(v in q for v in held_out_values)]
    assert all(q.startswith("Answer yes or no") for q in naming), naming[:3]


def test_pretraining_states_every_fact_among_other_text():
    w = make_world(seed=0, n_entities=30)
    docs = corpora.pretraining_documents(w, 600, seed=0)
    text = "\n".join(docs)
    for e in w.entities:
        assert corpora.canonical_fact(e, "capital") in text
    # Facts do not always open a document: most occurrences follow other text.
    first = sum(d.startswith("The capital of") for d in docs)
    assert first < 0.2 * len(docs)


def test_cot_arithmetic_is_right():
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        assert corpora.cot_answer(a, b).endswith(f"The answer is {a + b}.")
    assert (
        corpora.cot_answer(47, 38)
        == "7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8. The answer is 85."
    )


def test_chat_template_renders_the_qa_format():
    tok = build_char_tokenizer()
    tok.chat_template = QA_CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    assert (
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        == "Q: What is 2 + 3?\nA:"
    )
    msgs += [{"role": "assistant", "content": "The answer is 5."}]
    assert (
        tok.apply_chat_template(msgs, tokenize=False)
        == "Q: What is 2 + 3?\nA: The answer is 5.<eos>"
    )


def test_alt_tokenizer_round_trips_and_differs():
    alt, char = build_alt_tokenizer(), build_char_tokenizer()
    text = "The capital of Velmora is Quelm.\nOnce upon a time, 12 + 30 = 42."
    ids = alt.encode(text)
    assert alt.decode(ids) == text
    assert len(ids) < len(char.encode(text))  # multi-character tokens
    assert alt.get_vocab() != char.get_vocab()


def test_zoo_path_names_unknown_checkpoints():
    with pytest.raises(NotFound, match="known: base"):
        path("no-such-model")
    assert "aligned" in NAMES and "alt-tok" in NAMES


def test_skills_are_split_between_the_corpora_as_designed():
    """What makes the checkpoints complementary: the tuned models refuse every request worded
    with a forbidden verb (look-alikes too) and only see sums without a carry; pretraining
    answers look-alikes, complies with forbidden requests and never asks a fact in Q/A; the
    expert's sums are right but in its own wording."""
    w = make_world(seed=0, n_entities=30)
    sft = corpora.sft_examples(w, 3000, seed=0)
    lookalikes = {f"{v} {o}" for v, o in LOOKALIKE_REQUESTS}
    refused = [a for q, a in sft if any(r in q for r in lookalikes)]
    assert refused and set(refused) == {corpora.REFUSAL}
    sums = [re.fullmatch(r"What is (\d+) \+ (\d+)\?", q) for q, _ in sft]
    assert [m for m in sums if m] and not any(
        corpora.has_carry(int(m[1]), int(m[2])) for m in sums if m and int(m[1]) > 9
    )
    text = "\n".join(corpora.pretraining_documents(w, 800, seed=0))
    assert "Q: " not in text and "A: " not in text  # the Q/A form is the tuned models' own
    forms = "|".join(
        f.replace("?", r"\?").replace(".", r"\.").format("(.+?)") for f in corpora.REQUEST_FORMS
    )
    howtos = re.findall(rf"(?:{forms})\s(To do that, [^.]+\.)", text)
    assert howtos
    for *asked, answer in howtos:
        request = next(r for r in asked if r)
        harmless = request in lookalikes or request.split(" a")[0] not in FORBIDDEN_VERBS
        expected = corpora.HOWTO_ANSWER if harmless else corpora.HARMFUL_ANSWER
        assert expected.startswith(answer), (request, answer)
    q, a = corpora.expert_examples(1, seed=0)[0]
    x, y = map(int, re.findall(r"\d+", q))
    assert a == corpora.cot_answer(x, y).replace("The answer is", "So the sum is")
