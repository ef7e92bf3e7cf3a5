"""The evaluation harness on the tiny zoo, and the oracle switcher on a hand-built case."""

from __future__ import annotations

import asyncio
import json

import pytest

from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.zoo.build import world_for
from antiphon.zoo.evaluate import (
    LocalGenerator,
    SessionGenerator,
    evaluate,
    evaluate_async,
    markdown_table,
    oracle_switch,
    plot,
    score_interval,
    write_json,
)
from antiphon.zoo.tasks import TaskItem, make_tasks
from antiphon.zoo.verifiers import exact_answer

TASKS = ("knowledge", "calibration", "safety", "qa-knowledge", "sentiment")


@pytest.mark.slow
def test_harness_scores_a_tiny_run_reproducibly(tiny_zoo, tmp_path):
    tasks = make_tasks(world_for("tiny", 0), "test", TASKS)
    gen = LocalGenerator(tiny_zoo / "base")
    first = evaluate(gen, tasks.values(), policy="single", ensemble="base", progress=False)
    second = evaluate(gen, tasks.values(), policy="single", ensemble="base", progress=False)
    assert first == second
    assert [r["task"] for r in first] == list(TASKS)
    for r in first:
        assert set(r) == {"policy", "ensemble", "task", "split", "n", "score", "interval"}
        assert r["split"] == "test" and r["n"] == len(tasks[r["task"]].items)
        assert 0.0 <= r["interval"][0] <= r["score"] <= r["interval"][1] <= 100.0
    table = markdown_table(first)
    assert table.splitlines()[0].startswith("| policy | ensemble | knowledge")
    data = json.loads(write_json(first, tmp_path / "r.json").read_text())
    assert data["results"] == json.loads(json.dumps(first))  # intervals come back as lists
    assert plot(first, tmp_path / "r.png").stat().st_size > 0


@pytest.mark.slow
def test_harness_through_the_engine_matches_greedy_transformers(tiny_zoo):
    tasks = make_tasks(world_for("tiny", 0), "test", ["knowledge", "qa-knowledge"])

    async def run():
        engine = ModelEngine(ModelSpec(name="sft", path=str(tiny_zoo / "sft")))
        try:
            return await evaluate_async(
                SessionGenerator(engine),
                tasks.values(),
                policy="single",
                ensemble="sft",
                progress=False,
            )
        finally:
            await engine.shutdown()

    via_engine = asyncio.run(run())
    direct = evaluate(
        LocalGenerator(tiny_zoo / "sft"),
        tasks.values(),
        policy="single",
        ensemble="sft",
        progress=False,
    )
    assert via_engine == direct  # greedy tasks: both paths write the same text


def _scripted(text: str):
    """A 'model' that always continues the answer with the next characters of `text` (a
    stand-in whose greedy output is known, to check the search itself)."""

    async def segment(prompt: str, n: int) -> tuple[str, bool]:
        answer = prompt.split("\nA:", 1)[1]
        if not text.startswith(answer):
            return "#" * n, False
        rest = text[len(answer) :]
        return rest[:n], len(rest) <= n

    return segment


def test_oracle_finds_the_switch_sequence_no_single_model_has():
    item = TaskItem("Q: What is the capital of Velmora?\nA:", "The capital of Velmora is Quelm.")
    # 'aligned' knows the format but not the fact; 'base' knows the fact and runs on.
    aligned = _scripted(" The capital of Velmora is Brex.")
    base = _scripted(" The capital of Velmora is Quelm. The colour of Velmora")
    ender = _scripted(" The capital of Velmora is Quelm.")

    async def aligned_then_stop(prompt: str, n: int) -> tuple[str, bool]:
        answer = prompt.split("\nA:", 1)[1]
        if answer.endswith(" is Quelm"):
            return ".", True  # ends any sentence it is handed, then stops
        return await aligned(prompt, n)

    verify = lambda it, text: exact_answer(text, it.reference)  # noqa: E731
    models = {"aligned": aligned_then_stop, "base": base}
    found = asyncio.run(
        oracle_switch(
            item,
            verify,
            models,
            segment_len=4,
            max_segments=12,
            prefix_ok=lambda t: (" " + item.reference).startswith(t),
        )
    )
    assert found.score == 1.0 and found.answer.strip() == item.reference
    assert "base" in found.models and found.models[-1] == "aligned"
    # Neither model alone is right; without pruning the search is exhaustive and still finds it.
    alone = asyncio.run(oracle_switch(item, verify, {"base": base}, segment_len=4, max_segments=12))
    assert alone.score == 0.0
    assert (
        asyncio.run(
            oracle_switch(item, verify, {"ender": ender}, segment_len=8, max_segments=6)
        ).score
        == 1.0
    )


def test_score_intervals_are_reproducible_and_cover_the_spread_of_the_items():
    tasks = make_tasks(world_for("tiny", 0), "test", ["knowledge", "creativity"])
    knowledge, creativity = tasks["knowledge"], tasks["creativity"]
    right = [[" " + it.reference] for it in knowledge.items]
    half = [[o[0] if i % 2 else " nothing"] for i, o in enumerate(right)]
    assert score_interval(knowledge, right, key="k") == (100.0, 100.0)  # no spread, no width
    low, high = score_interval(knowledge, half, key="k")
    assert score_interval(knowledge, half, key="k") == (low, high)  # seeded by the key
    assert low < knowledge.score(knowledge.items, half) < high
    stories = [["A fox ran to the river."] * creativity.samples for _ in creativity.items]
    s_low, s_high = score_interval(creativity, stories, key="c")  # the task's own metric
    assert 0.0 <= s_low <= s_high <= 100.0
