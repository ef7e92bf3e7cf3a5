"""Task splits: deterministic, disjoint, complete; the right answer scores 100."""

from __future__ import annotations

import pytest

from antiphon.errors import InvalidRequest, NotFound
from antiphon.zoo import corpora
from antiphon.zoo.tasks import COMPOSITIONAL_TASKS, TASK_NAMES, make_tasks
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


def test_compositional_tasks_ask_about_held_out_entities():
    held_out = {e.name for e in WORLD.held_out_entities}
    for name in COMPOSITIONAL_TASKS:
        for item in make_tasks(WORLD, "test", [name])[name].items:
            assert any(f" {n}" in item.prompt for n in held_out)


def test_reference_answers_score_full_marks():
    tasks = make_tasks(WORLD, "test")
    for name in ("knowledge", "arithmetic", "qa-capital", "qa-founder"):
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
