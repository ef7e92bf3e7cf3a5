"""The policy store on real files: candidates copied in with provenance, promotion, refusal
and rollback through served.json, the pure promotion gate, crash leftovers, and the
`antiphon policy` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from antiphon.checkpoint import weights_fingerprint
from antiphon.cli import main
from antiphon.errors import InvalidRequest, NotFound
from antiphon.training.policy_versions import (
    PolicyStore,
    Score,
    promotion_decision,
)
from tests.factories import make_tiny_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three tiny checkpoints with different weights (seeds 0, 1, 2)."""
    root = tmp_path_factory.mktemp("policy-ckpts")
    return [make_tiny_model(root / f"s{seed}", seed=seed, hidden_size=16) for seed in range(3)]


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def provenance(examples: int = 100, start: int = 0) -> dict:
    return {"log_offsets": [start, start + 4096], "examples": examples, "trainer": "test"}


def store_of_three(root, checkpoints) -> tuple[PolicyStore, list[str]]:
    store = PolicyStore(root)
    versions = [
        store.add_candidate(c, step=10 * (i + 1), provenance=provenance(start=i * 4096)).version
        for i, c in enumerate(checkpoints)
    ]
    return store, versions


# --- adding ---


def test_add_writes_the_version_and_its_provenance(tmp_path, checkpoints):
    source = checkpoints[0]
    before = snapshot(source)
    store = PolicyStore(tmp_path / "store")
    info = store.add_candidate(source, step=7, provenance=provenance(examples=321))

    assert info.version.startswith("000007-") and len(info.version) == 7 + 12
    assert info.path == tmp_path / "store" / "versions" / info.version
    assert (info.path / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()
    record = json.loads((info.path / "provenance.json").read_text())
    assert record["version"] == info.version and record["step"] == 7
    assert record["status"] == "candidate" and record["created"] > 0
    assert record["log_offsets"] == [0, 4096] and record["examples"] == 321
    assert info.status == "candidate" and info.dev_score is None
    assert info.provenance == provenance(examples=321)
    assert snapshot(source) == before  # the source is only read
    assert store.versions() == [info] and store.served() is None


def test_add_is_idempotent_and_weights_or_step_make_new_versions(tmp_path, checkpoints):
    store = PolicyStore(tmp_path / "store")
    first = store.add_candidate(checkpoints[0], step=1, provenance=provenance())
    again = store.add_candidate(checkpoints[0], step=1, provenance=provenance(examples=5))
    assert again == first  # the stored provenance stands
    other = store.add_candidate(checkpoints[1], step=1, provenance=provenance())
    later = store.add_candidate(checkpoints[0], step=2, provenance=provenance())
    assert len({first.version, other.version, later.version}) == 3
    assert [v.version for v in store.versions()] == [first.version, other.version, later.version]


def test_add_rejects_bad_input(tmp_path, checkpoints):
    store = PolicyStore(tmp_path / "store")
    with pytest.raises(NotFound, match="no checkpoint directory"):
        store.add_candidate(tmp_path / "nope", step=1, provenance={})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidRequest, match="no \\*.safetensors"):
        store.add_candidate(tmp_path / "empty", step=1, provenance={})
    with pytest.raises(InvalidRequest, match="store's own fields: status"):
        store.add_candidate(checkpoints[0], step=1, provenance={"status": "promoted"})
    with pytest.raises(InvalidRequest, match="step must be >= 0"):
        store.add_candidate(checkpoints[0], step=-1, provenance={})
    assert store.versions() == []


def test_a_crashed_add_leaves_nothing_visible(tmp_path, checkpoints):
    store = PolicyStore(tmp_path / "store")
    version = store.add_candidate(checkpoints[0], step=3, provenance={}).version
    # What a crash mid-copy leaves: a temp dir of the same version, half its files.
    leftover = tmp_path / "store" / "versions" / f".tmp-{version}-deadbeef"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    (tmp_path / "store" / ".tmp-served.json-deadbeef").write_text('{"served": "x"')
    store2 = PolicyStore(tmp_path / "store")
    assert [v.version for v in store2.versions()] == [version]
    assert store2.served() is None
    added = store2.add_candidate(checkpoints[1], step=3, provenance={})
    assert [v.version for v in store2.versions()] == [version, added.version]
    with pytest.raises(NotFound):
        store2.info(leftover.name)


def test_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hi")
    with pytest.raises(InvalidRequest, match="is not a policy store"):
        PolicyStore(tmp_path / "other")
    with pytest.raises(NotFound, match="no policy store at"):
        PolicyStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


# --- deciding ---


def test_promote_retires_the_previous_and_rollback_walks_back(tmp_path, checkpoints):
    store, (a, b, c) = store_of_three(tmp_path / "store", checkpoints)
    store.record_evaluation(a, Score(40.0, 35.0, 45.0, 50))
    assert store.info(a).dev_score == Score(40.0, 35.0, 45.0, 50)

    store.promote(a, "first")
    store.promote(b, "better")
    assert store.served().version == b
    assert [v.status for v in store.versions()] == ["retired", "promoted", "candidate"]
    served_file = json.loads((tmp_path / "store" / "served.json").read_text())
    assert served_file["served"] == b and served_file["stack"] == [a, b]
    assert json.loads((store.info(a).path / "provenance.json").read_text())["status"] == "retired"

    back = store.rollback(reason="regression")
    assert (
        back.version == a and store.served().version == a and store.info(a).reason == "regression"
    )
    assert store.info(b).status == "retired"
    assert [(h.version, h.action, h.previous) for h in store.history()] == [
        (a, "promote", None), (b, "promote", a), (a, "rollback", b),
    ]  # fmt: skip
    with pytest.raises(InvalidRequest, match="no previous version"):
        store.rollback()
    assert store.rollback(to=b).version == b  # b was served once: it may come back
    with pytest.raises(InvalidRequest, match="never served"):
        store.rollback(to=c)
    with pytest.raises(InvalidRequest, match="already served"):
        store.rollback(to=b)


def test_refused_versions_are_never_served(tmp_path, checkpoints):
    store, (a, b, c) = store_of_three(tmp_path / "store", checkpoints)
    store.refuse(c, "worse on dev")
    assert store.info(c).status == "refused" and store.info(c).reason == "worse on dev"
    assert (store.info(c).path / "model.safetensors").is_file()  # kept on disk
    with pytest.raises(InvalidRequest, match="was refused"):
        store.promote(c, "try anyway")

    store.promote(a, "first")
    with pytest.raises(InvalidRequest, match="is being served"):
        store.refuse(a, "no")
    store.promote(b, "second")
    store.refuse(a, "found a bug in it")  # retired, then refused: no way back
    with pytest.raises(InvalidRequest, match="cannot roll back to .*refused"):
        store.rollback(to=a)
    with pytest.raises(InvalidRequest, match="no previous version"):
        store.rollback()
    with pytest.raises(InvalidRequest, match="cannot roll back to .*refused"):
        store.rollback(to=c)
    assert store.served().version == b


def test_unknown_versions_and_empty_history(tmp_path, checkpoints):
    store, (a, _, _) = store_of_three(tmp_path / "store", checkpoints)
    with pytest.raises(InvalidRequest, match="nothing is served"):
        store.rollback()
    for call in (store.info, lambda v: store.promote(v, "r"), lambda v: store.refuse(v, "r"),
                 lambda v: store.record_evaluation(v, Score(1, 0, 2, 3))):  # fmt: skip
        with pytest.raises(NotFound, match="no version '000099-nope'.*known: 0000"):
            call("000099-nope")
    with pytest.raises(NotFound):
        store.info("../versions")
    store.promote(a, "first")
    with pytest.raises(NotFound, match="no version 'nope'"):
        store.rollback(to="nope")


# --- the gate ---


def test_a_better_candidate_is_promoted_and_a_worse_one_refused():
    served = [float(i % 2) for i in range(40)]  # mean 0.5
    better = [1.0] * 30 + served[30:]
    up = promotion_decision(better, served, resamples=200)
    assert up.promote and up.candidate.mean > up.current.mean
    assert up.difference.mean == pytest.approx(up.candidate.mean - up.current.mean)
    assert up.candidate.low <= up.candidate.mean <= up.candidate.high and up.candidate.n == 40
    assert up.difference.low > 0  # paired: the items that improved are the same in every draw
    assert up.reason.startswith(f"candidate {up.candidate} >= served {up.current}")

    down = promotion_decision(served, better, resamples=200)
    assert not down.promote and " < served " in down.reason
    assert down.difference.high < 0
    tie = promotion_decision(served, list(served), resamples=50)
    assert tie.promote and tie.difference == Score(0.0, 0.0, 0.0, 40)


def test_the_gate_without_a_served_version_and_on_bad_input():
    first = promotion_decision([0.2, 0.4, 0.9], None, resamples=100)
    assert first.promote and first.current is None and first.difference is None
    assert "no version is served" in first.reason
    with pytest.raises(InvalidRequest, match="same dev items"):
        promotion_decision([1.0, 0.0], [1.0, 0.0, 1.0])
    with pytest.raises(InvalidRequest, match="no dev scores"):
        promotion_decision([], None)
    with pytest.raises(InvalidRequest, match="finite"):
        promotion_decision([float("nan")], None)


def test_the_gate_is_deterministic_given_its_seed():
    cand = [((i * 7) % 10) / 10 for i in range(60)]
    cur = [((i * 3) % 10) / 10 for i in range(60)]
    one = promotion_decision(cand, cur, resamples=300, seed=1)
    assert promotion_decision(cand, cur, resamples=300, seed=1) == one
    other = promotion_decision(cand, cur, resamples=300, seed=2)
    assert other.promote == one.promote and other.candidate.mean == one.candidate.mean
    assert (other.candidate.low, other.candidate.high) != (one.candidate.low, one.candidate.high)


# --- the CLI ---


def test_cli_lists_versions_and_rolls_back(tmp_path, checkpoints, capsys):
    store, (a, b, c) = store_of_three(tmp_path / "store", checkpoints)
    store.record_evaluation(a, Score(40.0, 35.25, 45.5, 50))
    store.promote(a, "first")
    store.promote(b, "second")
    store.refuse(c, "worse")

    assert main(["policy", "versions", "--store", str(tmp_path / "store")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| version | step | status | dev score")
    assert rows[2] == f"| {a} | 10 | retired | 40.00 (35.25 to 45.50) |  | 100 | 0..4096 |"
    assert rows[3] == f"| {b} | 20 | promoted | - | * | 100 | 4096..8192 |"
    assert rows[4].startswith(f"| {c} | 30 | refused | - |  |")

    assert main(["policy", "rollback", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert f"rolled back from {b}: now serving {a} (step 10, dev score 40.00" in out
    assert store.served().version == a
    assert store.history()[-1].reason == "manual rollback (antiphon policy rollback)"

    assert main(["policy", "rollback", "--store", str(tmp_path / "store"), "--to", c]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == f"antiphon: error: InvalidRequest: cannot roll back to {c}: it was refused (worse)"
    )
    assert main(["policy", "rollback", "--store", str(tmp_path / "store"), "--to", "x"]) == 1
    assert "NotFound: no version 'x'" in capsys.readouterr().err
    assert store.served().version == a


def test_cli_as_a_subprocess_on_a_missing_store(tmp_path):
    command = ["policy", "versions", "--store", str(tmp_path / "no")]
    out = subprocess.run(
        [sys.executable, "-m", "antiphon.cli", *command],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        f"antiphon: error: NotFound: no policy store at {tmp_path / 'no'} (no versions/ directory)"
    )
    assert not (tmp_path / "no").exists()


def test_the_served_link_follows_promotions_and_rollbacks(tmp_path):
    """Serving points its switcher at one fixed path; its contents are the served version."""
    store = PolicyStore(tmp_path / "store")
    first = store.add_candidate(make_tiny_model(tmp_path / "m0", seed=0), step=0, provenance={})
    second = store.add_candidate(make_tiny_model(tmp_path / "m1", seed=1), step=1, provenance={})
    store.promote(first.version, reason="initial")
    assert weights_fingerprint(store.served_path) == weights_fingerprint(first.path)
    store.promote(second.version, reason="better")
    assert weights_fingerprint(store.served_path) == weights_fingerprint(second.path)
    store.rollback()
    assert weights_fingerprint(store.served_path) == weights_fingerprint(first.path)
    # a crash between served.json and the link: reopening the store mends the link
    (tmp_path / "store" / "served").unlink()
    os.symlink(Path("versions") / second.version, tmp_path / "store" / "served")
    reopened = PolicyStore(tmp_path / "store")
    assert weights_fingerprint(reopened.served_path) == weights_fingerprint(first.path)
