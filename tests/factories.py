"""Factories for tests: tiny random-weight checkpoints written the way real ones are.

`make_tiny_model` writes a Llama-architecture checkpoint (safetensors) next to a character
tokenizer and returns the directory; the code under test then loads it through the ordinary
loader, exactly as a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from antiphon.zoo.random_model import write_random_checkpoint
from antiphon.zoo.tokenizer import DEFAULT_ALPHABET
from antiphon.zoo.train import ModelShape


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_context: int = 512,
    alphabet: str = DEFAULT_ALPHABET,
) -> Path:
    """Write a random-weight causal LM + tokenizer to out_dir (HF format) and return it."""
    shape = ModelShape(hidden=hidden_size, layers=num_layers, heads=num_heads, context=max_context)
    return write_random_checkpoint(out_dir, seed=seed, shape=shape, alphabet=alphabet)
