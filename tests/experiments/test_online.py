"""The online learning experiment end to end at smoke size (one round of six dev queries,
one test and one dev item per task), in a process of its own (it runs its own local Ray and
app): the result files, their fields, and no request failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_experiment_writes_the_curve_the_reference_and_the_refusal(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "antiphon.experiments.online", "--rounds", "1", "--queries", "6",
         "--test-limit", "1", "--dev-limit", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "online.json").read_text())
    for field in ("initial_score", "final_score", "offline_score", "failed_requests",
                  "promotions", "bad_candidate_refused", "curve"):  # fmt: skip
        assert field in data, field
    assert [p["round"] for p in data["curve"]] == [0, 1]
    for point in data["curve"]:
        low, high = point["interval"]
        assert 0.0 <= low <= point["score"] <= high <= 100.0
        assert point["n"] == 6  # one test item of each of the six tasks
    assert data["failed_requests"] == 0
    assert data["rounds"][0]["rewarded"] == data["rounds"][0]["asked"] == 6
    assert data["rounds"][0]["probe_requests"] >= 1  # traffic while the candidate was judged
    # at smoke size the gate may see a tie (promoted: "at least as good"); served follows it
    bad = data["bad_candidate"]
    assert bad["served_unchanged"] == bad["refused"] == data["bad_candidate_refused"]
    assert data["promotions"] in (0, 1)
    md = (out / "online.md").read_text()
    assert "| round | dev queries |" in md and (out / "online.png").is_file()
