"""The experiment's checks, computed from hand-made test scores."""

from __future__ import annotations

import json

import pytest

from antiphon.experiments.switch import claims, markdown
from antiphon.zoo.tasks import EXACT_TASKS, HELD_OUT_TASKS, SWITCH_ENSEMBLE

TASKS = ("qa-knowledge", "qa-format", "qa-fact-sum")


def row(scores: dict[str, float], per_item: dict[str, list[float]]) -> dict:
    return {t: (scores[t], per_item[t], (scores[t] - 5, scores[t] + 5)) for t in TASKS}


def test_claims_compare_switch_with_every_baseline_and_count_rescued_questions():
    items = {"qa-knowledge": [1.0, 0.0], "qa-format": [0.0, 1.0], "qa-fact-sum": [0.0, 0.0]}
    scores = {
        "single:a": row({"qa-knowledge": 50, "qa-format": 50, "qa-fact-sum": 0}, items),
        "single:b": row(
            {"qa-knowledge": 0, "qa-format": 0, "qa-fact-sum": 0}, {t: [0.0, 0.0] for t in TASKS}
        ),  # fmt: skip
        "random_switch": row({"qa-knowledge": 10, "qa-format": 10, "qa-fact-sum": 0}, items),
        "trained_router": row({"qa-knowledge": 50, "qa-format": 50, "qa-fact-sum": 0}, items),
        "logit_fusion": row({"qa-knowledge": 60, "qa-format": 0, "qa-fact-sum": 50}, items),
        "switch": row(
            {"qa-knowledge": 100, "qa-format": 50, "qa-fact-sum": 50},
            {"qa-knowledge": [1.0, 1.0], "qa-format": [0.0, 1.0], "qa-fact-sum": [1.0, 0.0]},
        ),  # fmt: skip
    }
    summary = claims(scores, ["single:a", "single:b"], {"qa-fact-sum": 70.0})
    assert summary["switch_beats_best_single"] == {
        "qa-knowledge": True, "qa-format": False, "qa-fact-sum": True,
    }  # fmt: skip
    assert summary["core_tasks_won"].startswith("1/2")
    assert summary["all_compositional_won"] is True
    assert summary["compositional_oracle_minus_switch"] == {"qa-fact-sum": 20.0}
    assert summary["compositional_within_15_of_oracle"] is False
    assert summary["held_out_won"] is None  # no held-out task among these
    assert summary["switch_minus_random"] == round((200 - 20) / 3, 2)
    assert summary["switch_beats_router"] and summary["switch_beats_fusion"]
    # failed by both singles: qa-knowledge #1, qa-format #0, qa-fact-sum #0 and #1; switch solves 2
    assert summary["questions_every_single_fails"] == 4
    assert summary["of_those_switch_solves"] == 2
    assert summary["share_switch_solves_pct"] == 50.0
    table = markdown(scores, summary, {"k": 1})
    assert "| switch | 100.0 | 50.0 | 50.0 | 66.7 |" in table
    assert "| switch | 95.0-105.0 | 45.0-55.0 | 45.0-55.0 |" in table  # the intervals table


@pytest.mark.slow
def test_the_experiment_runs_end_to_end_on_the_zoo(tmp_path):
    """The documented command, tiny: two rounds (round 2 cuts prefixes from round 1's
    switcher), a DAgger round on round 2's switcher, the router, every policy on a few test
    items, both files."""
    from antiphon.experiments.switch import main

    results = main(["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
                    "--limit", "1", "--k", "2", "--prefixes", "2", "--test-limit", "1",
                    "--epochs", "1", "--max-context", "512", "--rounds", "2",
                    "--oracle-limit", "1", "--dagger-rounds", "1"])  # fmt: skip
    provenance = json.loads((tmp_path / "work" / "rollouts-r2" / "provenance.json").read_text())
    assert provenance["config"]["prefix_policy"] == "switch" and provenance["round"] == 2
    assert provenance["config"]["prefix_policy_params"]["switcher_path"].endswith("switcher-r1")
    # on-policy: round 2's branches are completed by round 1's switcher too
    assert provenance["config"]["completion_switcher"]["switcher_path"].endswith("switcher-r1")
    records = [
        json.loads(line)
        for r in ("rollouts", "rollouts-r2")
        for line in (tmp_path / "work" / r / "examples.jsonl").read_text().splitlines()
    ]
    rollout_tasks = {rec["task"] for rec in records if not rec.get("skipped")}
    assert rollout_tasks and not rollout_tasks & set(HELD_OUT_TASKS)  # never trained on
    # the exact-answer tasks are labelled by the oracle's path, the others by rollouts
    oracle_file = tmp_path / "work" / "oracle-labels" / "examples.jsonl"
    oracle_tasks = {json.loads(line)["task"] for line in oracle_file.read_text().splitlines()}
    assert oracle_tasks == set(EXACT_TASKS) - set(HELD_OUT_TASKS)
    assert not rollout_tasks & oracle_tasks
    assert results["rollouts"]["oracle_path_informative"] > 0
    assert set(HELD_OUT_TASKS) <= set(results["scores"]["switch"])  # but tested
    rounds = [(r.get("round"), r.get("dagger_round")) for r in results["switcher_training"]]
    assert rounds == [(1, None), (2, None), (None, 1)]
    # DAgger: round 2's switcher walked the oracle's dev items; its states, labelled, are
    # examples of the switcher then tested, fine-tuned from round 2's
    paths = tmp_path / "work" / "switcher-paths-d1"
    walked = json.loads((paths / "provenance.json").read_text())
    assert walked["switcher"].endswith("switcher") and walked["queries"] == len(oracle_tasks)
    lines = (paths / "examples.jsonl").read_text().splitlines()
    path_records = [json.loads(line) for line in lines]
    assert path_records and all(":switch-" in rec["key"] for rec in path_records)
    assert {rec["task"] for rec in path_records} <= oracle_tasks
    tested = tmp_path / "work" / "switcher-d1"
    assert json.loads((tested / "switcher_training.json").read_text())["init"] == walked["switcher"]
    assert results["switcher"] == str(tested)  # the switcher the test split saw
    singles = {f"single:{m}" for m in SWITCH_ENSEMBLE}
    assert set(results["scores"]) == singles | {"random_switch", "trained_router", "logit_fusion",
                                                "switch"}  # fmt: skip
    saved = json.loads((tmp_path / "results" / "switch.json").read_text())
    assert saved["summary"] == results["summary"]
    assert "| switch |" in (tmp_path / "results" / "switch.md").read_text()
    assert set(saved["intervals"]) == set(saved["scores"])  # an interval for every score
    assert list(saved["phase_seconds"]) == ["oracle_labels", "rollouts_r1", "training_r1",
                                            "rollouts_r2", "training_r2", "switcher_paths_d1",
                                            "training_d1", "router",
                                            "test_evaluation"]  # fmt: skip
    assert all(isinstance(s, int) and s >= 0 for s in saved["phase_seconds"].values())
    for row in saved["intervals"].values():
        assert all(0.0 <= low <= high <= 100.0 for low, high in row.values())
    assert (tmp_path / "results" / "switch.png").stat().st_size > 0
