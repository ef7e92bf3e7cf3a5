"""The shape the architecture promises (docs/architecture.md): the turn loop and the engine
front stay small, no function in the coordinator or the model actors grows long, and the
replicas and actors that run no model start without importing one. The import layers are
checked by `lint-imports` (its contracts are in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import antiphon

PACKAGE = Path(antiphon.__file__).parent
MAX_LINES = {"coordinator/loop.py": 250, "actors/engine.py": 350}
MAX_FUNCTION_LINES = 80


def test_the_turn_loop_and_the_engine_front_stay_small():
    for path, limit in MAX_LINES.items():
        lines = len((PACKAGE / path).read_text().splitlines())
        assert lines < limit, f"{path} has {lines} lines (keep it under {limit})"


def test_no_function_in_the_coordinator_or_the_actors_is_over_80_lines():
    long = []
    for package in ("coordinator", "actors"):
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({n} lines)")
    assert long == []


# what a process hosting the module's class never needs: the seconds of import that every
# replica or actor pays when it starts
NOT_IMPORTED = {
    # the ingress and the coordinator read tokenizers and call model deployments
    "antiphon.deploy.ingress": ("transformers.modeling_utils", "antiphon.actors.engine", "openai"),
    "antiphon.coordinator.deployment": ("transformers.modeling_utils", "antiphon.actors.engine",
                                        "openai"),
    # the turn log writes records: no model, no tokenizer
    "antiphon.training.turn_log_actor": ("torch", "transformers"),
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(NOT_IMPORTED))
def test_replicas_and_actors_import_only_what_they_run(module):
    probe = (f"import sys, {module}; "
             f"print([m for m in {NOT_IMPORTED[module]!r} if m in sys.modules])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
