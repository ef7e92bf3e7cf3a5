"""The deferral experiment end to end at smoke size (two test items per task, gates from
two dev tasks, three thresholds): the result files and their shape."""

from __future__ import annotations

import json

import pytest

from antiphon.experiments import deferral

pytestmark = pytest.mark.slow


def test_the_experiment_writes_every_row_with_intervals_and_rates(tmp_path):
    out = tmp_path / "results"
    summary = deferral.main(["--limit", "2", "--no-joint", "--runs", str(tmp_path / "runs"),
                             "--out", str(out), "--gate-tasks", "qa-knowledge", "qa-safety",
                             "--rates", "0", "0.2", "1"])  # fmt: skip
    data = json.loads((out / "deferral.json").read_text())
    rows = ["base", "assistant", "random_deferral", "weak_label_gate", "co_llm", "proxy_tuning"]
    assert list(data["scores"]) == rows
    tasks = list(data["scores"]["co_llm"])
    assert "qa-knowledge" in tasks and "qa-safety" in tasks
    for row in rows:
        assert list(data["scores"][row]) == tasks
        for t in tasks:
            low, high = data["intervals"][row][t]
            assert 0.0 <= low <= data["scores"][row][t] <= high <= 100.0
    rates = data["deferral_rate"]
    assert rates["base"] == 0.0 and rates["assistant"] == 1.0 and rates["proxy_tuning"] is None
    assert rates["random_deferral"] == pytest.approx(rates["co_llm"], abs=0.25)
    assert summary == data["summary"] and "co_llm_beats_both_alone" in summary
    assert "co_llm_joint_beats_both_alone" not in summary  # --no-joint
    md = (out / "deferral.md").read_text()
    assert "| co_llm |" in md and "## Where it defers" in md and (out / "deferral.png").is_file()
    assert set(data["annotated"]) == {"co_llm"} and set(data["annotated"]["co_llm"]) == set(tasks)
