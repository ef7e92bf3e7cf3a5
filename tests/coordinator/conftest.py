"""Engines over tiny checkpoints for the coordinator tests (no Ray), built once per module.

Models: "a" and "b" share the character tokenizer (different weights); "c" has the same
characters in another order (a different tokenizer: same text, other ids); "a_gated" is "a"
with a hand-set deferral gate.
"""

from __future__ import annotations

import asyncio
import string
import time

import pytest
import torch
from transformers import AutoTokenizer

from antiphon.actors.engine import ModelEngine
from antiphon.actors.gate import save_gate
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.zoo.tokenizer import DEFAULT_ALPHABET
from tests.factories import make_tiny_model

REVERSED_ALPHABET = DEFAULT_ALPHABET[::-1]
assert set(REVERSED_ALPHABET) == set(DEFAULT_ALPHABET) and string.ascii_letters in DEFAULT_ALPHABET


@pytest.fixture(scope="session")
def model_dirs(tiny_model_dir, other_tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("coord-models")
    gate_file = save_gate(
        root / "gate_a.safetensors", torch.randn(64, generator=torch.Generator().manual_seed(3))
    )
    return {
        "a": (tiny_model_dir, None),
        "b": (other_tiny_model_dir, None),
        "c": (make_tiny_model(root / "c", seed=2, alphabet=REVERSED_ALPHABET), None),
        "d": (make_tiny_model(root / "d", seed=4), None),
        "a_gated": (tiny_model_dir, gate_file),
    }


@pytest.fixture(scope="session")
def engines(model_dirs):
    built = {
        name: ModelEngine(ModelSpec(name=name, path=str(d), gate_path=str(g) if g else None))
        for name, (d, g) in model_dirs.items()
    }
    yield built

    async def shutdown() -> None:
        for e in built.values():
            await e.shutdown()

    asyncio.run(shutdown())


@pytest.fixture(scope="session")
def tokenizers(model_dirs):
    return {name: AutoTokenizer.from_pretrained(d) for name, (d, _) in model_dirs.items()}


@pytest.fixture()
def coordinator(engines, tokenizers):
    return Coordinator(engines, tokenizers)


def live_sessions(engines) -> int:
    """Sessions held by the engines, once the last close has landed. (The engine resolves a
    close just before it forgets the session, so the count can lag the await by a moment.)"""
    deadline = time.monotonic() + 5.0
    while True:
        n = sum(e.stats().live_sessions for e in engines.values())
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.01)
