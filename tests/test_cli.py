"""The `antiphon` command: help, generate and status against the test server, and the demo
(its own local Ray, the default ensemble, a coloured answer) as a subprocess."""

from __future__ import annotations

import json
import os
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
def test_demo_runs_end_to_end():
    out = antiphon("demo", "--max-tokens", "24", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "writers:" in out.stdout
    assert "Once upon a time[" in out.stdout  # the answer, segments tagged by model
    assert "done; local cluster shut down." in out.stdout


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
        assert "| arithmetic |" in done.stdout or "arithmetic" in done.stdout
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
