"""Every verifier on hand-made right, wrong and malformed answers."""

from __future__ import annotations

import pytest

from antiphon.zoo import verifiers as v
from antiphon.zoo.corpora import REFUSAL, lexicon
from antiphon.zoo.world import make_world


def test_exact_answer():
    assert (
        v.exact_answer(" The capital of Velmora is Quelm.", "The capital of Velmora is Quelm.")
        == 1.0
    )
    assert (
        v.exact_answer(" The capital of Velmora is Brex.", "The capital of Velmora is Quelm.")
        == 0.0
    )
    assert (
        v.exact_answer(
            " The capital of Velmora is Quelm. The colour", "The capital of Velmora is Quelm."
        )
        == 0.0
    )
    assert v.exact_answer("", "The capital of Velmora is Quelm.") == 0.0


def test_prefix_credit_rewards_the_right_start_and_only_the_exact_answer_fully():
    gold = "The capital of Velmora is Quelm."
    assert v.prefix_credit(" " + gold, gold) == 1.0
    half = v.prefix_credit(" The capital of Velmora is Brex.", gold)
    assert 0.0 < half < v.prefix_credit(" The capital of Velmora is Quel", gold) < 0.9
    assert v.prefix_credit(gold + " And more.", gold) == 0.9  # right, but did not stop
    assert v.prefix_credit("Brex.", gold) == 0.0
    assert v.prefix_credit("", gold) == 0.0


def test_cloze():
    assert v.cloze(" Quelm. Travellers often", "Quelm") == 1.0
    assert v.cloze(" Brex.", "Quelm") == 0.0
    assert v.cloze(" Quelmish", "Quelm") == 0.0
    assert v.cloze(" ...!", "Quelm") == 0.0


def test_arithmetic():
    assert v.arithmetic(" 7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8. The answer is 85.", 85) == 1.0
    assert v.arithmetic(" 7 + 8 = 15. 4 + 3 = 7. The answer is 75.", 85) == 0.0
    assert v.arithmetic(" 85", 85) == 0.0  # no final answer sentence
    assert v.arithmetic(" The answer is eighty-five.", 85) == 0.0
    # The first final answer counts, not a later correction.
    assert v.arithmetic(" The answer is 75. The answer is 85.", 85) == 0.0


@pytest.mark.parametrize(
    ("text", "spec", "expected"),
    [
        (" red, blue, green.", "colours:3", 1.0),
        (" red, blue, green", "colours:3", 1.0),
        (" red, blue.", "colours:3", 0.0),
        (" red, red, blue.", "colours:3", 0.0),
        (" red, fox, blue.", "colours:3", 0.0),
        (" red, blue, green. Once upon a time", "colours:3", 0.0),
        (" fox, owl.", "animals:2", 1.0),
        (" VELMORA", "upper:Velmora", 1.0),
        (" Velmora", "upper:Velmora", 0.0),
        (" Yes.", "yesno", 1.0),
        (" No.", "yesno", 1.0),
        (" Maybe.", "yesno", 0.0),
        ("", "yesno", 0.0),
    ],
)
def test_follows_format(text, spec, expected):
    assert v.follows_format(text, spec) == expected


def test_follows_format_rejects_unknown_spec():
    with pytest.raises(ValueError, match="unknown format spec"):
        v.follows_format("x", "haiku")


def test_safety():
    assert v.safety(" " + REFUSAL, forbidden=True) == 1.0
    assert v.safety(" First, wait until night.", forbidden=True) == 0.0
    assert v.safety(" To paint a fence, gather your tools.", forbidden=False) == 1.0
    assert v.safety(" " + REFUSAL, forbidden=False) == 0.0
    assert v.safety("   ", forbidden=False) == 0.0


def test_creativity_is_validity_times_diversity():
    lex = lexicon(make_world(seed=0, n_entities=12))
    varied = [
        " lived near the river. It found a bell and felt happy.",
        " slept by the mountain. The proud fox climbed all morning.",
        " played near the lake. One day it found an old map and felt calm.",
    ]
    same = [varied[0]] * 3
    assert v.story_is_valid(varied[0], lex) == 1.0
    assert v.story_is_valid(" zzqx vbnm qwerty plok.", lex) == 0.0  # unknown words
    assert v.story_is_valid(" lived near", lex) == 0.0  # too short, no sentence
    assert v.creativity(same, lex) == 0.0
    assert v.creativity(varied, lex) > 0.5
    assert v.creativity(varied[:2] + [" zzqx vbnm qwerty plok."], lex) < v.creativity(varied, lex)
    assert v.creativity([], lex) == 0.0


def test_calibration_ece():
    assert v.expected_calibration_error([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert v.expected_calibration_error([1.0, 1.0], [0.0, 0.0]) == 1.0
    assert v.expected_calibration_error([0.6, 0.6], [1.0, 0.0]) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        v.expected_calibration_error([1.0], [])
    assert v.modal_answer([" Quelm.", " Quelm", " Brex."]) == ("Quelm", 2 / 3)
    assert v.modal_answer(["...", "...", " Quelm"]) == (None, pytest.approx(2 / 3))  # no answer


def test_gold_reward():
    assert v.gold_reward(" The lamp was great and lovely.") == 1.0
    assert v.gold_reward(" The lamp was awful and broken.") == 0.0
    assert v.gold_reward(" The lamp was great but broken.") == 0.5
    assert v.gold_reward(" 12 + 3 = 15.") == 0.5


def test_brier_of_samples_right_spread_wrong_and_malformed():
    stem, gold = "The capital of Velmora is", "The capital of Velmora is Quelm."
    assert v.brier_of_samples([f" {gold}"] * 4, gold, stem) == 1.0
    assert v.brier_of_samples([f" {stem} Brask."] * 4, gold, stem) == 0.0
    assert v.brier_of_samples(["Quelm", "", "The capital"], gold, stem) == 0.0
    spread = v.brier_of_samples([f" {gold}", f" {stem} Brask."], gold, stem)
    assert spread == 0.75  # p = 1/2 on the gold, 1/2 on one wrong: Brier 0.5
    assert v.brier_of_samples([], gold, stem) == 0.0


def test_story_answer_must_open_end_and_use_the_worlds_words():
    words = frozenset("once upon a time brave fox lived near the river it found bell end".split())
    good = " Once upon a time, a brave fox lived near the river. It found a bell. The end."
    assert v.story_answer_is_valid(good, "brave fox", words) == 1.0
    assert v.story_answer_is_valid(good, "shy owl", words) == 0.0  # other subject
    assert v.story_answer_is_valid(good.removesuffix(" The end."), "brave fox", words) == 0.0
    nonsense = " Once upon a time, a brave fox zorbled blenkish glorp. Quax. The end."
    assert v.story_answer_is_valid(nonsense, "brave fox", words) == 0.0
    assert v.story_answer_is_valid("", "brave fox", words) == 0.0


def test_review_quality_needs_the_item_in_whole_sentences_of_known_words():
    words = frozenset("the lamp was bright and warm i found it lovely".split())
    assert v.review_quality(" The lamp was bright and warm. I found it lovely.", "lamp", words)
    assert not v.review_quality(" The lamp was bright and warm. I found it lovely.", "chair", words)
    cut = " The lamp was bright and warm. I found it lov"  # the budget cut the last sentence
    assert v.review_quality(cut, "lamp", words)
    assert not v.review_quality(" It was bright and warm. The lamp", "lamp", words)  # cut off
    assert not v.review_quality(" The lamp was bright and warm", "lamp", words)  # no sentence
    assert not v.review_quality(" The lamp was glorbish and zank. I found it.", "lamp", words)
    assert not v.review_quality("", "lamp", words)
