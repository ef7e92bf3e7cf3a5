"""The `antiphon` command: help, generate and status against the test server, and the demo
(its own local Ray, the default ensemble, a coloured answer) as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.deploy.server import API_KEY


def antiphon(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "antiphon.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip


def test_help_lists_the_commands():
    out = antiphon("--help")
    assert out.returncode == 0
    for command in ("serve", "generate", "status", "demo", "zoo", "train", "eval"):
        assert command in out.stdout


def test_generate_against_a_running_server(server):
    out = antiphon("generate", "Once upon a time", "--url", server.url, "--api-key", API_KEY,
                   "--ensemble", "pair", "--max-tokens", "8")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "writers: [a|a]  [b|b]" in out.stdout  # the legend, uncoloured
    assert "Once upon a time[a|" in out.stdout  # the prompt, then the first segment by a
    assert "request id:" in out.stdout


def test_generate_json_and_errors(server):
    out = antiphon("generate", "Hi", "--url", server.url, "--api-key", API_KEY, "--json",
                   "--max-tokens", "4")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert '"segments"' in out.stdout
    bad = antiphon("generate", "Hi", "--url", server.url, "--api-key", API_KEY,
                   "--ensemble", "nope")  # fmt: skip
    assert bad.returncode == 1
    assert "NotFound: unknown ensemble 'nope'" in bad.stderr


def test_status(server):
    out = antiphon("status", "--url", server.url, "--api-key", API_KEY)
    assert out.returncode == 0, out.stderr
    assert "healthy" in out.stdout and "ensemble pair: models a, b" in out.stdout
    down = antiphon("status", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "no antiphon server" in down.stdout


@pytest.mark.slow
def test_demo_shows_switch_generation_next_to_each_model_alone():
    """The shipped switcher's demo question: the switched answer (segments tagged by writer)
    is the right one, and every model alone writes something else."""
    from antiphon.cli import demo_question

    question = demo_question()
    out = antiphon("demo", "--color", "never", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "writers:" in out.stdout and "done; local cluster shut down." in out.stdout
    after_legend = out.stdout.split("writers:", 1)[1].split("\n\n", 1)[1]
    switched = after_legend.split(" alone:", 1)[0]
    tagged = re.findall(r"\[([^|\]]+)\|([^\]]*)\]", switched)  # [writer|text] per segment
    assert "".join(text for _, text in tagged).strip() == question["reference"]
    assert len({writer for writer, _ in tagged}) >= 2  # a collaboration
    alone = [line for line in out.stdout.splitlines() if " alone:" in line]
    assert len(alone) == 4
    for line in alone:
        text = "".join(re.findall(r"\|([^\]]*)\]", line))
        assert text.strip() != question["reference"], line


@pytest.mark.slow
def test_eval_scores_through_the_server_and_repeats(server, tmp_path):
    """`antiphon eval` over HTTP: a markdown table, the JSON report and a plot; same seed,
    same numbers."""
    reports = []
    for run in ("first", "second"):
        out = tmp_path / f"{run}.json"
        done = antiphon(
            "eval", "--url", server.url, "--api-key", API_KEY, "--ensemble", "pair",
            "--policy", "round_robin", "--tasks", "arithmetic", "safety", "--limit", "3",
            "--seed", "7", "--out", str(out),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "| arithmetic |" in done.stdout
        assert out.with_suffix(".png").stat().st_size > 0
        reports.append(json.loads(out.read_text()))
    results = reports[0]["results"]
    assert {r["task"] for r in results} == {"arithmetic", "safety"}
    for r in results:
        assert (r["policy"], r["ensemble"], r["split"], r["n"]) == (
            "round_robin",
            "pair",
            "test",
            3,
        )
        assert 0.0 <= r["score"] <= 100.0
    assert reports[0]["results"] == reports[1]["results"]


def test_eval_names_an_unknown_task():
    done = antiphon("eval", "--url", "http://127.0.0.1:9", "--ensemble", "pair",
                    "--policy", "fixed", "--tasks", "no-such-task")  # fmt: skip
    assert done.returncode == 1
    assert "unknown task(s) ['no-such-task']" in done.stderr


@pytest.mark.slow
def test_train_switcher_runs_rollouts_trains_and_resumes(tmp_path):
    """`antiphon train switcher` on the shipped zoo, tiny: rollouts (with the empty first
    prefix and the dense reward on the compositional task), a trained switcher the `switch`
    policy loads, and a rerun that resumes instead of rolling out again."""
    args = ("train", "switcher", "--ensemble", "base,aligned", "--tasks", "knowledge",
            "qa-knowledge", "--out", str(tmp_path), "--limit", "2", "--k", "2", "--prefixes", "2",
            "--epochs", "1", "--max-context", "512")  # fmt: skip
    out = antiphon(*args, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = (tmp_path / "rollouts" / "examples.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) == 2 * 2 * 2  # tasks x queries x prefixes
    firsts = [r for r in records if r["key"].endswith(":0") and not r.get("skipped")]
    assert firsts and all(r["prefix"] == [] for r in firsts)
    qa = [s for r in records if r["task"] == "qa-knowledge" for row in r["scores"] for s in row]
    assert any(0 < s < 1 for s in qa)  # prefix credit, not 0/1 exact match
    provenance = json.loads((tmp_path / "rollouts" / "provenance.json").read_text())
    assert provenance["status"] == "done" and provenance["config"]["empty_first_prefix"]
    report = json.loads(out.stdout[out.stdout.index("{") :])
    assert report["train_examples"] + report["val_examples"] > 0
    assert (tmp_path / "switcher" / "model.safetensors").exists()

    from antiphon.policies import build_policy

    switch = build_policy("switch", {"switcher_path": str(tmp_path / "switcher")},
                          ensemble=("base", "aligned"))  # fmt: skip
    assert switch.version != "unknown"

    again = antiphon(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "rollouts" / "examples.jsonl").read_text().splitlines() == lines
