"""The shape the architecture promises (docs/architecture.md): the turn loop and the engine
front stay small, and no function in the coordinator or the model actors grows long. The
import layers are checked by `lint-imports` (its contracts are in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def test_replicas_that_only_call_models_do_not_import_the_model_classes():
    """The ingress and coordinator replicas read tokenizers and call model deployments: the
    engine and transformers' model classes (seconds of import in every replica that starts)
    stay out of their modules' imports."""
    modules = ("antiphon.deploy.ingress", "antiphon.coordinator.deployment")
    probe = (f"import sys; import {', '.join(modules)}; "
             "print([m for m in ('transformers.modeling_utils', 'antiphon.actors.engine', "
             "'openai') if m in sys.modules])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
