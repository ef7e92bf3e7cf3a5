"""`antiphon train gate` end to end on the zoo's sft and strong (a few tasks and rates, so
that it runs in seconds): what lands on disk, that the gate serves, that eta is the sweep's
best, and the joint (gate + base) variant."""

from __future__ import annotations

import asyncio
import json

import pytest

from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest
from antiphon.experiments import train_gate
from antiphon.training.gate_data import GateData
from antiphon.training.gate_pipeline import GatePairConfig, train_gate_pair

ARGS = ["--base", "zoo:sft", "--assistant", "zoo:strong", "--tasks", "qa-knowledge",
        "qa-safety", "--rates", "0", "0.2", "1", "--weak-steps", "60",
        "--marginal-steps", "60"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate")
    card = train_gate.main([*ARGS, "--out", str(out), "--joint", "full", "--joint-steps", "4"])
    return out, card


def test_the_job_writes_gates_curves_sweep_and_card(trained):
    out, card = trained
    for f in ("gate.safetensors", "weak/gate.safetensors", "joint/gate.safetensors",
              "joint/config.json", "curves.json", "curves.png", "thresholds.json",
              "thresholds.png", "gate_card.json", "data/gate_data.safetensors"):  # fmt: skip
        assert (out / f).is_file(), f
    assert json.loads((out / "gate_card.json").read_text()) == card
    data = GateData.load(out / "data")
    prov = data.provenance
    assert prov["base"] == "zoo:sft" and prov["assistant"] == "zoo:strong"
    assert prov["split"] == "dev" and prov["base_weights"] != prov["assistant_weights"]
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"weak_label", "marginal", "joint"}
    marginal = curves["marginal"]
    assert marginal[-1]["train"] < marginal[0]["train"]  # the likelihood went up
    sweep = json.loads((out / "thresholds.json").read_text())
    for name, gate in card["gates"].items():
        points = sweep[name]
        assert [p["target_rate"] for p in points] == [0.0, 0.2, 1.0]
        best = max(points, key=lambda p: (p["score"], -p["deferral_rate"]))
        assert gate["eta"] == pytest.approx(best["eta"], abs=1e-6)
        assert points[0]["deferral_rate"] == 0.0 and points[-1]["deferral_rate"] == 1.0
        assert (gate["warning"] is not None) == (gate["val_deferral_rate"] == 0.0)
    assert card["serve"]["policy"] == "defer"


def test_the_gates_load_where_they_are_served(trained):
    out, card = trained

    async def infos():
        engines = [ModelEngine(ModelSpec(name="sft", path="zoo:sft",
                                         gate_path=str(out / "gate.safetensors"))),
                   ModelEngine(ModelSpec(name="joint", path=str(out / "joint")))]  # fmt: skip
        try:
            return [await e.info() for e in engines]
        finally:
            for e in engines:
                await e.shutdown()

    plain, joint = asyncio.run(infos())
    assert plain.gate_fingerprint == card["gates"]["marginal"]["fingerprint"]
    assert joint.gate_fingerprint == card["gates"]["joint"]["fingerprint"]


def test_gates_need_one_tokenizer(tmp_path):
    cfg = GatePairConfig(base="zoo:sft", assistant="zoo:alt-tok", out=tmp_path)
    with pytest.raises(InvalidRequest, match="different tokenizers"):
        asyncio.run(train_gate_pair(cfg))
