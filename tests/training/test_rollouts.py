"""Rollout labelling through the real coordinator over constant models: "y" always writes y,
"x" always X, and the verifier pays for y's, so the best next writer is known: "y"."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from antiphon.training.rollouts import (
    RolloutConfig,
    RolloutQuery,
    RolloutStore,
    cut_point,
    example_key,
    label_from_utilities,
    prefix_decisions,
    queries_from_tasks,
    run_rollouts,
)


def share_of_y(text: str) -> float:
    return text.count("y") / max(1, len(text))


QUERIES = [RolloutQuery(f"t:{i}", "t", f"Q{i}: say y\nA:", share_of_y, 12) for i in range(3)]


def test_cut_and_prefix_decisions():
    rng = random.Random(0)
    cuts = [cut_point(20, rng, 0.1, 0.9) for _ in range(500)]
    assert min(cuts) == 2 and max(cuts) == 18
    assert cut_point(2, rng, 0.1, 0.9) == 1
    assert prefix_decisions([("a", 4), ("b", 4), ("a", 4)], 6) == (["a", "b"], [4, 2])
    assert prefix_decisions([("a", 4), ("b", 4)], 4) == (["a"], [4])


def test_ties_keep_every_best_and_label_the_lowest():
    assert label_from_utilities([0.5, 1.0, 1.0]) == ([1, 2], 1)
    assert label_from_utilities([0.0, 0.0]) == ([0, 1], 0)


def test_rollouts_label_the_known_best_and_resume(xy_coordinator, tmp_path):
    calls = []

    async def generate(request):
        calls.append(request)
        return await xy_coordinator.generate(request)

    cfg = RolloutConfig(k=2, segment_len=4, prefixes_per_query=2, seed=1, concurrency=4)
    store = RolloutStore(tmp_path / "ro")
    examples = asyncio.run(
        run_rollouts(generate, QUERIES, ("x", "y"), cfg, store, {"note": "test"}, progress=False)
    )
    assert len(examples) == 6 and len(calls) == 6 * (1 + 2 * 2)
    for ex in examples:
        assert ex.models == ["x", "y"]
        assert ex.best == [1] and ex.label == 1 and ex.informative
        assert ex.utilities[1] > ex.utilities[0]
        assert 2 <= ex.prefix_tokens <= 10 and ex.total_tokens == 12
        prefix_text = "".join(t for _, t in ex.prefix)
        assert len(prefix_text) == ex.prefix_tokens
        assert all(set(t) == {"Xy"[i]} for i, t in ex.prefix)  # tags name the real writer
    provenance = json.loads((tmp_path / "ro" / "provenance.json").read_text())
    assert provenance["status"] == "done" and provenance["config"]["k"] == 2
    assert provenance["note"] == "test" and provenance["examples"] == 6

    # Resume: a second run over more queries only does the new ones.
    calls.clear()
    more = QUERIES + [RolloutQuery("t:9", "t", "Q9:", share_of_y, 12)]
    again = asyncio.run(
        run_rollouts(generate, more, ("x", "y"), cfg, RolloutStore(tmp_path / "ro"), progress=False)
    )
    assert len(again) == 8 and len(calls) == 2 * (1 + 2 * 2)
    lines = (tmp_path / "ro" / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len({json.loads(x)["key"] for x in lines}) == 8


def test_a_store_written_whole_is_finished_and_one_cut_by_a_crash_is_not(xy_coordinator, tmp_path):
    """Labellers that make all their examples at once (the oracle's) keep them with
    `write_all`: a run cut part way is never read back as a whole one."""
    cfg = RolloutConfig(k=2, segment_len=4, prefixes_per_query=2, seed=1)
    made = RolloutStore(tmp_path / "made")
    examples = asyncio.run(
        run_rollouts(xy_coordinator.generate, QUERIES, ("x", "y"), cfg, made, progress=False)
    )
    store = RolloutStore(tmp_path / "ro")
    store.append(examples[0].key, examples[0])  # a crash after the first append
    assert not RolloutStore(tmp_path / "ro").finished
    store.write_provenance({"status": "running"})  # or after marking itself running
    assert not RolloutStore(tmp_path / "ro").finished
    (tmp_path / "ro" / "provenance.json").write_text('{"status": "do')  # or mid-write
    assert not RolloutStore(tmp_path / "ro").finished
    store.write_all(examples[1:], {"labels": "test"})
    again = RolloutStore(tmp_path / "ro")
    assert again.finished and again.done == {ex.key for ex in examples[1:]}
    assert again.examples() == examples[1:]  # the partial run's line replaced, not kept
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["examples.jsonl",
                                                                  "provenance.json"]  # fmt: skip
    assert RolloutStore(tmp_path / "made").finished  # run_rollouts' own "done"


def test_empty_first_prefix_labels_the_first_decision(xy_coordinator, tmp_path):
    cfg = RolloutConfig(k=2, segment_len=4, prefixes_per_query=2, empty_first_prefix=True, seed=1)
    examples = asyncio.run(
        run_rollouts(
            xy_coordinator.generate,
            QUERIES[:2],
            ("x", "y"),
            cfg,
            RolloutStore(tmp_path / "ro"),
            progress=False,
        )  # fmt: skip
    )
    by_prefix = {ex.key.rsplit(":", 1)[1]: [] for ex in examples}
    for ex in examples:
        by_prefix[ex.key.rsplit(":", 1)[1]].append(ex)
    assert all(ex.prefix == [] and ex.prefix_tokens == 0 for ex in by_prefix["0"])
    assert all(ex.prefix and ex.prefix_tokens >= 2 for ex in by_prefix["1"])
    # With nothing written yet, y's first segment still makes the better answer.
    assert all(ex.best == [1] for ex in examples)


def test_zoo_queries_score_a_branch_by_the_tasks_own_metric():
    """Creativity's metric reads a set (validity x diversity): identical valid stories are
    worth nothing, varied ones are; a mean-verified task's utility is the mean; a dense reward
    replaces the verifier where given."""
    from antiphon.zoo.build import world_for
    from antiphon.zoo.tasks import make_tasks
    from antiphon.zoo.verifiers import prefix_credit

    tasks = make_tasks(world_for("tiny", 0), "dev", ["creativity", "knowledge", "qa-knowledge"])
    rewards = {"qa-knowledge": lambda item, text: prefix_credit(text, item.reference)}
    queries = {q.task: q for q in queries_from_tasks(tasks, limit=1, rewards=rewards)}
    story = " lived near the river. It found a bell and felt happy. The end."
    other = " waited by the old bridge. The wise hare climbed the tower. The end."
    creativity = queries["creativity"]
    assert creativity.samples == tasks["creativity"].samples
    assert creativity.verify(story) == 1.0 and creativity.utility([story, story]) == 0.0
    assert creativity.utility([story, other]) > 0.3

    knowledge = queries["knowledge"]
    gold = tasks["knowledge"].items[0].reference
    assert knowledge.utility([f" {gold}.", " Nope.", f" {gold}.", " No."]) == 0.5

    qa = queries["qa-knowledge"]
    answer = tasks["qa-knowledge"].items[0].reference
    assert qa.utility([" " + answer]) == 1.0 and 0 < qa.utility([" " + answer[:10]]) < 0.9


def test_router_outcomes_score_each_models_samples_by_the_query_metric(xy_coordinator):
    from antiphon.training.router_training import single_model_outcomes

    seen = []

    def share_of_y_in_set(texts):
        seen.append(len(texts))
        return sum(share_of_y(t) for t in texts) / len(texts)

    q = RolloutQuery("s:0", "s", "Q: y?\nA:", share_of_y, 6, score_set=share_of_y_in_set,
                     samples=3)  # fmt: skip
    (outcome,) = asyncio.run(single_model_outcomes(xy_coordinator.generate, [q], ("x", "y")))
    assert outcome.scores == (0.0, 1.0) and seen == [3, 3]


def test_rollouts_wait_out_a_full_model_instead_of_failing(constant_dirs, tmp_path):
    """Engines that hold 2 sessions at once, rollouts that want 10 in flight: the calls that
    find a model full (Overloaded) are retried, and every item is labelled."""
    from transformers import AutoTokenizer

    from antiphon.actors.engine import ModelEngine
    from antiphon.config import ModelSpec
    from antiphon.coordinator.loop import Coordinator

    async def run():
        engines = {n: ModelEngine(ModelSpec(name=n, path=str(d), max_sessions=2))
                   for n, d in constant_dirs.items()}  # fmt: skip
        toks = {n: AutoTokenizer.from_pretrained(d) for n, d in constant_dirs.items()}
        cfg = RolloutConfig(k=4, segment_len=4, prefixes_per_query=1, concurrency=2)
        try:
            return await run_rollouts(Coordinator(engines, toks).generate, QUERIES, ("x", "y"),
                                      cfg, RolloutStore(tmp_path), progress=False)  # fmt: skip
        finally:
            for e in engines.values():
                await e.shutdown()

    examples = asyncio.run(run())
    assert len(examples) == len(QUERIES) and all(ex.best == [1] for ex in examples)


def test_an_example_key_names_its_query_and_refuses_a_state_that_would_hide_it():
    from tests.switch_models import examples

    (ex,) = examples(1)
    for query_key in ("qa-safety:3", "req:with:colons"):
        ex.key = example_key(query_key, "oracle-2-8")
        assert ex.query_key == query_key  # what the trainer splits train from validation by
    with pytest.raises(ValueError, match="may not contain ':'"):
        example_key("qa-safety:3", "oracle:2:8")  # the old oracle key: read as "...:oracle:2"
