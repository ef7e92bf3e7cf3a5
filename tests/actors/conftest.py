"""The tiny checkpoint as the engine tests load it: its spec, and a second copy loaded with
plain transformers for the references (a test module may override either)."""

from __future__ import annotations

import pytest

from antiphon.checkpoint import load_checkpoint
from antiphon.config import ModelSpec


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(tiny_model_dir))


@pytest.fixture(scope="module")
def reference(spec):
    """The same checkpoint loaded again, to compute expected values with plain transformers."""
    model, tokenizer = load_checkpoint(spec)
    return model, tokenizer
