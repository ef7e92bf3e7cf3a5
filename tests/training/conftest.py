"""Hand-made rollout examples, a switcher trained on them (always "1"), and two constant
checkpoints ("x" always writes X, "y" always writes y) and an in-process
coordinator over them: rollouts whose best candidate is known by construction."""

from __future__ import annotations

import asyncio
import random

import pytest
from transformers import AutoTokenizer

from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.training.rollouts import RolloutExample
from antiphon.training.switcher_training import SwitcherTrainConfig, train_switcher
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


def examples(n: int, label: int = 1, seed: int = 0) -> list[RolloutExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prefix = [(rng.randrange(2), "".join(rng.choices("abcdef ", k=rng.randint(1, 9))))
                  for _ in range(rng.randint(0, 3))]  # fmt: skip
        utilities = [0.0, 0.0]
        utilities[label] = 1.0
        out.append(
            RolloutExample(
                f"q:{i}:0",
                "t",
                f"Q: item {i}?\nA:",
                ["a", "b"],
                prefix,
                utilities,
                [[u] for u in utilities],
                [label],
                label,
                3,
                9,
            )  # fmt: skip
        )
    return out


@pytest.fixture(scope="session")
def trained_switcher(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("switcher")
    cfg = SwitcherTrainConfig(epochs=3, batch_size=8, lr=1e-3, val_fraction=0.25)
    report = train_switcher(examples(40), str(tiny_model_dir), out, cfg, progress=False)
    return out, report
