"""The online trainer of the switcher on a real turn log and real checkpoints: the promotion gate
both ways, the served link, and exactly-once progress across a real kill."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from antiphon.checkpoint import weights_fingerprint
from antiphon.training.online_learners import SwitchLearner
from antiphon.training.online_trainer import (
    OnlineTrainConfig,
    OnlineTrainer,
    TrainerState,
    examples_judge,
)
from antiphon.training.policy_versions import PolicyStore
from antiphon.training.rollouts import RolloutExample, RolloutStore
from antiphon.training.turn_log import FeedbackRecord, RequestRecord, TurnLogWriter, TurnRecord

MODELS = ("a", "b")
TRAIN = {"epochs": 3, "lr": 1e-3, "batch_size": 8}


def logged_request(request_id: str, writer: str, reward: float) -> list:
    """A switch request of two segments by one writer, as the coordinator logs it, and the
    client's reward for it."""
    turns = [
        TurnRecord(
            request_id=request_id,
            turn=i,
            segment=i,
            policy="switch",
            policy_version="v0",
            decision={"kind": "write", "model": writer, "max_tokens": 4},
            model=writer,
            segment_kind="write",
            token_ids=(5, 6),
            text=f" {writer}{i}",
            logprobs=(-1.0, -1.0),
            model_finish="length",
            policy_ms=1.0,
            model_ms=2.0,
        )  # fmt: skip
        for i in range(2)
    ]
    done = RequestRecord(
        request_id=request_id, prompt=f"Question {request_id}?", models=MODELS, policy="switch",
        policy_version="v0", policy_params={}, num_turns=2, num_segments=2,
        text="".join(t.text for t in turns), finish_reason="length", error=None,
    )  # fmt: skip
    return [*turns, done, FeedbackRecord(request_id, reward)]


def traffic(n: int, good: str, start: int = 0) -> list:
    """n requests by a random writer each, rewarded 1 when the writer is `good`."""
    rng = random.Random(start)
    records = []
    for i in range(start, start + n):
        writer = rng.choice(MODELS)
        records += logged_request(f"r{i}", writer, float(writer == good))
    return records


def dev_examples(root: Path) -> Path:
    """Labelled dev examples on which model b is always the best writer."""
    store = RolloutStore(root)
    for i in range(12):
        prefix = [(i % 2, f" seg{i}")] if i % 3 else []
        store.append(f"d{i}:0", RolloutExample(
            key=f"d{i}:0", task="dev", query=f"Dev question {i}?", models=list(MODELS),
            prefix=prefix, utilities=[0.0, 1.0], scores=[[0.0], [1.0]], best=[1], label=1,
            prefix_tokens=1, total_tokens=4,
        ))  # fmt: skip
    return root


def config(tmp_path: Path, init: Path, **overrides) -> OnlineTrainConfig:
    fields = {
        "turn_log": str(tmp_path / "turns"), "store": str(tmp_path / "store"),
        "state_dir": str(tmp_path / "state"), "init": str(init),
        "examples_per_candidate": 16, "replay": 0, "train": TRAIN,
        "dev": {"examples": str(dev_examples(tmp_path / "dev"))},
    }  # fmt: skip
    return OnlineTrainConfig(**{**fields, **overrides})


@pytest.mark.slow
def test_the_gate_promotes_a_better_candidate_and_refuses_one_trained_on_inverted_rewards(
    tmp_path, tiny_model_dir
):
    cfg = config(tmp_path, tiny_model_dir, examples_per_candidate=10**6)  # a round each
    published = []
    judge = examples_judge(cfg.dev.examples)
    trainer = OnlineTrainer(cfg, SwitchLearner(cfg.train), judge, published.append)
    initial = trainer.served()
    assert [v.version for v in published] == [initial.version]  # served from the start

    with TurnLogWriter(cfg.turn_log) as log:
        log.append(traffic(24, good="b"))
    assert trainer.poll() == []  # too few examples for a candidate of their own accord
    better = trainer.train_pending()  # the round ends
    assert better.promoted, better.reason
    assert trainer.served().version == better.version.version
    assert published[-1].version == better.version.version
    assert better.version.provenance["log_offsets"][0] == 0
    assert better.version.provenance["parent"] == initial.version
    served_link = Path(cfg.store) / "served"
    assert weights_fingerprint(served_link) == weights_fingerprint(better.version.path)

    with TurnLogWriter(cfg.turn_log) as log:  # the rewards turned upside down
        end = log.append(traffic(24, good="a", start=24))
    trainer.poll()
    worse = trainer.train_pending()
    assert not worse.promoted, worse.reason
    store = PolicyStore(cfg.store)
    assert store.info(worse.version.version).status == "refused"
    assert store.served().version == better.version.version  # still served, still linked
    assert weights_fingerprint(served_link) == weights_fingerprint(better.version.path)
    assert len(published) == 2  # the refused one never published
    assert worse.version.dev_score.mean < better.version.dev_score.mean
    # everything read, and the log told so (its retention may drop what came before)
    state = TrainerState.load(Path(cfg.state_dir))
    assert state.offset == end and state.step == 2
    first, second = better.version.provenance, worse.version.provenance
    assert second["log_offsets"] == [first["log_offsets"][1], end]
    assert (first["examples"], second["examples"]) == (28, 26)  # the requests above baseline
    assert trainer.train_pending() is None  # nothing pending

    # an operator rolls back (antiphon policy rollback): the next poll publishes it
    store.rollback()
    assert trainer.poll() == [] and published[-1].version == initial.version
    assert trainer.poll() == [] and len(published) == 3  # once


def run_trainer(cfg_path: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "antiphon.cli", "train", "online", "--config", str(cfg_path),
         "--until-idle"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )  # fmt: skip


def finished_state(root: Path, init: Path, kill_after_candidates: int | None) -> dict:
    """Train over a fixed log (four candidates' worth) from the shell; with
    `kill_after_candidates`, kill -9 the trainer once that many candidates are in the store
    (it is then making the next) and start it again."""
    root.mkdir()
    cfg = config(root, init)
    with TurnLogWriter(cfg.turn_log, segment_bytes=4096) as log:  # rotated as it goes
        log.append(traffic(64, good="b"))
    cfg_path = root / "online.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump()))
    if kill_after_candidates is not None:
        proc = run_trainer(cfg_path, start_new_session=True)
        store_dir, deadline = Path(cfg.store) / "versions", time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            made = [p for p in store_dir.glob("0*") if not p.name.startswith("000000")]
            if len(made) >= kill_after_candidates:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()  # killed mid-run, not after it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc = run_trainer(cfg_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    state = json.loads((Path(cfg.state_dir) / "trainer_state.json").read_text())
    store = PolicyStore(cfg.store)
    steps = {}
    for v in store.versions():
        steps.setdefault(v.step, set()).add(tuple(v.provenance["log_offsets"]))
    return {"state": state, "steps": steps, "served": store.served().version,
            "statuses": [(v.step, v.status) for v in store.versions()]}  # fmt: skip


@pytest.mark.slow
def test_a_killed_trainer_resumes_with_no_turn_skipped_or_counted_twice(tmp_path, tiny_model_dir):
    """Killed mid-candidate and started again, the trainer ends where one never killed
    does: the same offset, counters, candidates (each over the same log range) and the
    same served version."""
    whole = finished_state(tmp_path / "whole", tiny_model_dir, kill_after_candidates=None)
    killed = finished_state(tmp_path / "killed", tiny_model_dir, kill_after_candidates=2)
    assert killed["state"]["offset"] == whole["state"]["offset"] > 0
    assert killed["state"]["joiner"]["counters"] == whole["state"]["joiner"]["counters"]
    assert whole["state"]["joiner"]["counters"]["rewarded"] == 64  # each request once
    assert killed["steps"] == whole["steps"] and len(whole["steps"]) == 5  # initial + 4
    assert all(len(ranges) == 1 for ranges in killed["steps"].values())
    ranges = [next(iter(whole["steps"][s])) for s in sorted(whole["steps"])][1:]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
    assert killed["served"] == whole["served"]
    assert killed["statuses"] == whole["statuses"]
