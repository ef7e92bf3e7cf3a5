"""Oracle-path labels, on real checkpoints: two constant models (x writes X, y writes y) whose
every segment is known, so the states the oracle passes and each label are known by
construction; then a zoo dev item, where following the labels writes the reference."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from functools import partial

import pytest

from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.training.oracle_labels import (
    OracleQuery,
    OracleState,
    label_by_oracle,
    label_switcher_paths,
    reference_query,
    state_example,
    tag_order,
)
from antiphon.training.switcher_training import split_by_query
from antiphon.zoo.evaluate import SessionGenerator, zoo_tasks
from antiphon.zoo.tasks import SWITCH_ENSEMBLE


def run_with_engines(specs: dict[str, str], work):
    """work(writers) over in-process engines of `specs` {name: path}, shut down after."""

    async def main():
        engines = {n: ModelEngine(ModelSpec(name=n, path=p)) for n, p in specs.items()}
        try:
            return await work({n: SessionGenerator(e).segment for n, e in engines.items()})
        finally:
            for e in engines.values():
                await e.shutdown()

    return asyncio.run(main())


def exact(target: str, max_tokens: int, key: str = "q:0") -> OracleQuery:
    return OracleQuery(key=key, task="t", prompt="Q: go\nA:", on_path=target.startswith,
                       solved=lambda text: text == target, max_tokens=max_tokens)  # fmt: skip


def test_each_state_on_the_path_is_labelled_with_the_writers_that_keep_it_right(constant_dirs):
    specs = {n: str(d) for n, d in constant_dirs.items()}
    examples = run_with_engines(
        specs, partial(label_by_oracle, [exact("XXyyXX", 6)], segment_len=2)
    )
    assert [ex.prefix for ex in examples] == [[], [(0, "XX")], [(0, "XX"), (1, "yy")]]
    # "XX" then "yy" then "XX", where the last segment fills the budget and is verified whole
    assert [ex.best for ex in examples] == [[0], [1], [0]]
    assert [ex.utilities for ex in examples] == [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    assert all(ex.informative and ex.models == ["x", "y"] for ex in examples)
    assert len({ex.key for ex in examples}) == 3
    # every state of one query stays on one side of the trainer's train/validation split
    for seed in range(8):
        train, val = split_by_query(examples, 0.5, seed=seed)
        assert sorted(map(len, (train, val))) == [0, 3]


def test_a_question_no_writer_can_answer_gives_one_tied_example(constant_dirs):
    specs = {n: str(d) for n, d in constant_dirs.items()}
    examples = run_with_engines(specs, partial(label_by_oracle, [exact("zz", 4)], segment_len=2))
    assert len(examples) == 1 and examples[0].utilities == [0.0, 0.0]
    assert not examples[0].informative  # the trainer skips it


def test_both_writers_right_expands_the_text_once(constant_dirs):
    """Two writers that reach the same right text: one state, not two (the search stays
    linear in the answer's length)."""
    specs = {"x1": str(constant_dirs["x"]), "x2": str(constant_dirs["x"])}
    examples = run_with_engines(specs, partial(label_by_oracle, [exact("XXXX", 4)], segment_len=2))
    assert [ex.prefix for ex in examples] == [[], [(0, "XX")]]
    assert all(ex.best == [0, 1] and not ex.informative for ex in examples)


def test_a_segment_is_tagged_with_its_writer_that_is_right_most_often():
    """Pure: where several writers wrote a segment's text, the trace names the one right most
    often over the labelled states (what a trained switcher picks), not the first in the
    ensemble; a text one writer alone wrote keeps that writer."""
    states = [
        OracleState((), (True, True, False)),
        OracleState((((0, 1), "XX"),), (False, True, True)),
        OracleState((((0, 1), "XX"), ((2,), "yy")), (True, True, False)),
    ]
    order = tag_order(states, 3)
    assert order == [1, 0, 2]  # b right 3 times, a and c fewer (a before c: 2 against 1)
    q = exact("XXyyZZ", 6)
    examples = [state_example(q, ["a", "b", "c"], s, order, segment_len=2) for s in states]
    assert [ex.prefix for ex in examples] == [[], [(1, "XX")], [(1, "XX"), (2, "yy")]]
    assert [ex.best for ex in examples] == [[0, 1], [1, 2], [0, 1]]
    assert tag_order(states[1:2], 3) == [1, 2, 0]  # ties keep the ensemble's order


@pytest.mark.slow
def test_following_the_labels_writes_the_reference_of_a_zoo_dev_item():
    """On the zoo: for each labelled state, the first right writer's segment is the next part
    of the reference, and the labels of a question the oracle solves spell out the whole
    answer; and no dev item is labelled twice."""
    task = zoo_tasks("dev", ["qa-arithmetic"])["qa-arithmetic"]
    queries = [
        reference_query(f"qa-arithmetic:{i}", "qa-arithmetic", item.prompt, item.reference,
                        partial(task.verify, item), task.max_new_tokens)
        for i, item in enumerate(task.items[:3])
    ]  # fmt: skip
    specs = {n: f"zoo:{n}" for n in SWITCH_ENSEMBLE}
    examples = run_with_engines(specs, partial(label_by_oracle, queries, segment_len=4))
    assert len({ex.key for ex in examples}) == len(examples)
    by_query = {q.prompt: [ex for ex in examples if ex.query == q.prompt] for q in queries}
    solved = 0
    for item, exs in zip(task.items[:3], by_query.values(), strict=True):
        target = " " + item.reference
        for ex in exs:
            text = "".join(t for _, t in ex.prefix)
            assert target.startswith(text)  # every labelled state is on the reference
        deepest = max(exs, key=lambda ex: len(ex.prefix))
        rest = len(target) - len("".join(t for _, t in deepest.prefix))
        # a right writer there finishes the answer: the labels reach the end of the reference
        solved += rest <= 4 and deepest.utilities[deepest.label] == 1.0
    # the arithmetic expert writes every carry: the oracle answers each of these
    assert solved == 3


def test_a_switchers_path_is_labelled_up_to_its_first_wrong_segment(constant_dirs):
    """DAgger's states: along the switcher's own answer, each state labelled as the oracle
    labels it, and none past the first segment that left the reference."""
    specs = {n: str(d) for n, d in constant_dirs.items()}
    q = exact("XXyyXX", 6)
    wrong = [(0, "XX"), (0, "XX"), (1, "yy")]  # the second "XX" leaves the reference
    right = [(0, "XX"), (1, "yy"), (0, "XX")]
    work = partial(label_switcher_paths, [q, replace(q, key="q:1")], paths=[wrong, right],
                   segment_len=2)  # fmt: skip
    examples = run_with_engines(specs, work)
    assert [(ex.prefix, ex.best) for ex in examples] == [
        ([], [0]), ([(0, "XX")], [1]),  # the wrong path: its first state, and the one it erred in
        ([], [0]), ([(0, "XX")], [1]), ([(0, "XX"), (1, "yy")], [0]),
    ]  # fmt: skip
    assert all(":switch-" in ex.key for ex in examples)  # never the oracle's key for a state


def test_a_switchers_path_keeps_the_switchers_own_writer(constant_dirs):
    """Where two writers wrote the same text, the trace names the one the switcher picked,
    not the one the oracle's tag order would (the point of labelling its own states)."""
    specs = {"x1": str(constant_dirs["x"]), "x2": str(constant_dirs["x"])}
    work = partial(label_switcher_paths, [exact("XXXX", 4)], paths=[[(1, "XX"), (1, "XX")]],
                   segment_len=2)  # fmt: skip
    examples = run_with_engines(specs, work)
    assert [ex.prefix for ex in examples] == [[], [(1, "XX")]]
