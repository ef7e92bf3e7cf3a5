"""The world and the corpora are pure functions of their seed, and split the entities as
designed: instruction data states facts of the SFT minority only."""

from __future__ import annotations

import random

import pytest

from antiphon.errors import NotFound
from antiphon.zoo import NAMES, corpora, path
from antiphon.zoo.tokenizer import QA_CHAT_TEMPLATE, build_alt_tokenizer, build_char_tokenizer
from antiphon.zoo.world import make_world


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
