"""`antiphon.zoo.measure` on a tiny build: every score with its interval, the oracles bound
what their models reach alone, and the properties follow from the rows they were decided on
(for the shipped results too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from antiphon.zoo.measure import DEFERRAL_PAIRS, ORACLE_MODELS, check, measure
from antiphon.zoo.tasks import EXACT_TASKS, TASK_NAMES

pytestmark = pytest.mark.slow
SHIPPED = Path(__file__).parents[2] / "results" / "zoo.json"


@pytest.fixture(scope="module")
def measured(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo-results")
    measure(tiny_zoo, out, limit=3)
    return out


def test_measure_writes_every_score_with_its_interval(measured):
    found = json.loads((measured / "zoo.json").read_text())
    singles = [r for r in found["results"] if r["policy"] == "single"]
    assert {r["task"] for r in singles} == set(TASK_NAMES)
    for r in found["results"]:
        low, high = r["interval"]
        assert low <= r["score"] <= high, r
    assert (measured / "zoo.md").read_text().startswith("# Zoo")
    assert (measured / "zoo.png").stat().st_size > 0


def test_oracles_reach_at_least_what_their_models_reach_alone(measured):
    rows = json.loads((measured / "zoo.json").read_text())["results"]
    single = {(r["ensemble"], r["task"]): r["score"] for r in rows if r["policy"] == "single"}
    switch = {r["task"]: r["score"] for r in rows if r["policy"] == "oracle-switch"}
    assert set(switch) == set(EXACT_TASKS)
    for task, score in switch.items():  # one model writing every segment is a switch sequence
        assert score >= max(single[(m, task)] for m in ORACLE_MODELS), task
    defer = {r["task"]: r for r in rows if r["policy"] == "oracle-defer"}
    assert set(defer) == set(DEFERRAL_PAIRS)
    for task, r in defer.items():
        assert r["ensemble"] == "+".join(DEFERRAL_PAIRS[task])
        assert r["score"] >= max(single[(m, task)] for m in DEFERRAL_PAIRS[task]), task


def test_the_properties_follow_from_the_rows(measured):
    found = json.loads((measured / "zoo.json").read_text())
    assert found["checks"] == json.loads(json.dumps(check(found["results"])))


def test_the_shipped_results_properties_follow_from_their_rows():
    found = json.loads(SHIPPED.read_text())
    assert found["checks"] == json.loads(json.dumps(check(found["results"])))
