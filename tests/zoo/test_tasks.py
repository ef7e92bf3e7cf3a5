"""Task splits: deterministic, disjoint, complete; the right answer scores 100."""

from __future__ import annotations

import pytest

from antiphon.errors import InvalidRequest, NotFound
from antiphon.zoo import corpora
from antiphon.zoo.tasks import (
    COMPOSITIONAL_TASKS,
    EXACT_TASKS,
    HELD_OUT_TASKS,
    TASK_NAMES,
    make_tasks,
)
from antiphon.zoo.world import make_world

WORLD = make_world(seed=0, n_entities=40)


def test_splits_are_deterministic_and_disjoint():
    dev, test = make_tasks(WORLD, "dev"), make_tasks(WORLD, "test")
    assert set(dev) == set(test) == set(TASK_NAMES)
    for name in TASK_NAMES:
        assert dev[name].items == make_tasks(WORLD, "dev", [name])[name].items
        assert dev[name].items and test[name].items
        if name != "format":  # format items are generic instructions and may repeat
            assert not set(dev[name].items) & set(test[name].items), name


def test_fact_tasks_ask_about_held_out_entities_only():
    held_out = {e.name for e in WORLD.held_out_entities}
    sft = {e.name for e in WORLD.sft_entities}
    fact_tasks = ("qa-knowledge", "qa-format", "qa-calibration", *COMPOSITIONAL_TASKS)
    for name in (*fact_tasks, *HELD_OUT_TASKS):
        for item in make_tasks(WORLD, "test", [name])[name].items:
            named = {n for n in held_out | sft if f" {n}" in item.prompt}
            assert named and named <= held_out, (name, item.prompt)


def test_asked_tasks_have_at_least_54_items_a_split():
    world = make_world(seed=0, n_entities=54)  # the full zoo's world
    for split in ("dev", "test"):
        for name, task in make_tasks(world, split).items():
            if name.startswith("qa-"):
                assert len(task.items) >= 50, (name, split, len(task.items))


def test_reference_answers_score_full_marks():
    tasks = make_tasks(WORLD, "test")
    for name in ("knowledge", "arithmetic", *EXACT_TASKS):
        t = tasks[name]
        answers = []
        for it in t.items:
            if name == "arithmetic":
                a, b = (int(x) for x in it.prompt.split("What is ")[1].rstrip("?\nA:").split(" + "))
                answers.append([" " + corpora.cot_answer(a, b)])
            elif name == "knowledge":
                answers.append([f" {it.reference}. More text"])
            else:
                answers.append([" " + it.reference])
        assert t.score(t.items, answers) == 100.0, name
        assert t.score(t.items, [["garbage"] for _ in t.items]) == 0.0, name


def test_unknown_task_or_split_is_rejected():
    with pytest.raises(NotFound, match="unknown task"):
        make_tasks(WORLD, "test", ["poetry"])
    with pytest.raises(InvalidRequest, match="split"):
        make_tasks(WORLD, "train")


def test_calibration_rewards_right_and_calibrated_answers():
    task = make_tasks(WORLD, "test", ["qa-calibration"])["qa-calibration"]
    items = task.items[:2]
    right = [[" " + it.reference] * task.samples for it in items]
    wrong = [[" " + it.reference.rsplit(" ", 1)[0] + " Zzz."] * task.samples for it in items]
    malformed = [["banana"] * task.samples for _ in items]
    half = [[" " + it.reference, " " + it.reference.rsplit(" ", 1)[0] + " Zzz."] for it in items]
    assert task.score(items, right) == 100.0
    assert task.score(items, wrong) == task.score(items, malformed) == 0.0
    assert 0.0 < task.score(items, half) < 100.0


def test_story_answers_must_be_valid_and_varied():
    task = make_tasks(WORLD, "test", ["qa-creativity"])["qa-creativity"]
    item = task.items[0]
    subject = item.reference
    canonical = " " + corpora.canonical_story(subject)
    varied = [
        f" Once upon a time, a {subject} lived near the lake. It found a feather. The end.",
        f" Once upon a time, a {subject} slept near the cave. It ran by the hill. The end.",
    ]
    assert task.score([item], [[canonical, canonical]]) == 0.0  # valid, no variety
    assert task.score([item], [varied]) > 0.0
    cut_off = [v.removesuffix(" The end.") for v in varied]  # never finished
    assert task.score([item], [cut_off]) == 0.0
