"""The weak-to-strong search experiment end to end at smoke size (two items per split, one
sample each, without the black-box rows, which the endpoint tests cover): the result files,
their shape, and the search's large-model tokens."""

from __future__ import annotations

import json

import pytest

from antiphon.experiments import search

pytestmark = pytest.mark.slow


def test_the_experiment_writes_every_row_with_intervals_and_tokens(tmp_path):
    out = tmp_path / "results"
    summary = search.main(["--limit", "2", "--samples", "1", "--dev-samples", "1",
                           "--no-blackbox", "--out", str(out)])  # fmt: skip
    data = json.loads((out / "search.json").read_text())
    rows = ["unguided", "bon", "cbs", "eft", "guides_alone"]
    assert list(data["scores"]) == rows
    for row in rows:
        for metric in search.METRICS:
            low, high = data["intervals"][row][metric]
            assert 0.0 <= low <= data["scores"][row][metric] <= high <= 100.0
    tokens = {row: data["scores"][row]["strong_tokens"] for row in rows}
    # BoN and CBS sample 16 responses' worth of strong tokens; unguided one; the guide none
    assert tokens["bon"] > 8 * tokens["unguided"] and tokens["cbs"] > 8 * tokens["unguided"]
    assert tokens["guides_alone"] == 0.0
    assert data["setup"]["chunk_len"] in search.CHUNK_LENS
    assert data["setup"]["beta"] in search.EFT_BETAS
    assert summary == data["summary"] and "cbs_gt_bon_gt_unguided" in summary
    assert "blackbox_same_ranking" not in summary  # --no-blackbox
    assert {"bon N=1", "bon N=16", f"cbs W=4 K=4 L={data['setup']['chunk_len']}"} <= set(
        data["curve"]
    )
    md = (out / "search.md").read_text()
    assert "| cbs |" in md and "## What must hold" in md and (out / "search.png").is_file()
