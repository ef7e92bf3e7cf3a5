"""The checkpoints shipped in the package: within the size limits and loadable by name."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from antiphon.zoo import CHECKPOINT_DIR, NAMES, path

MB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "zoo.json").exists(), reason="zoo checkpoints not installed"
)


def test_shipped_zoo_is_within_size_limits():
    files = [f for f in CHECKPOINT_DIR.rglob("*") if f.is_file()]
    assert all(f.stat().st_size <= 25 * MB for f in files)
    assert sum(f.stat().st_size for f in files) <= 80 * MB
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth")]  # safetensors only


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_checkpoint_loads_by_name(name):
    d = path(name)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.vocab_size == len(tok)
    assert tok.chat_template is not None
