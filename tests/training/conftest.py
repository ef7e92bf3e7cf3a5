"""Two constant checkpoints ("x" always writes X, "y" always writes y) and an in-process
coordinator over them: rollouts whose best candidate is known by construction."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from tests.switch_models import make_constant_model


@pytest.fixture(scope="session")
def constant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("constant-models")
    return {"x": make_constant_model(root / "x", "X"), "y": make_constant_model(root / "y", "y")}


@pytest.fixture(scope="module")
def xy_coordinator(constant_dirs):
    engines = {n: ModelEngine(ModelSpec(name=n, path=str(d))) for n, d in constant_dirs.items()}
    tokenizers = {n: AutoTokenizer.from_pretrained(d) for n, d in constant_dirs.items()}
    yield Coordinator(engines, tokenizers)

    async def shutdown() -> None:
        for e in engines.values():
            await e.shutdown()

    asyncio.run(shutdown())
