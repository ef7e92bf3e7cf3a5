"""Checkpoints with known behaviour for the Switch Generation tests (real HF checkpoints,
loaded through the ordinary loader).

`make_constant_model(dir, "X")` writes a Llama whose greedy output is always the character
X, whatever the context: one residual dimension is held at a constant by the embeddings
(no layer writes to it), the final norm keeps only that dimension, and the output head reads
it into X's logit alone. Texts of an ensemble of such models say exactly who wrote what.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.factories import make_tiny_model

HELD = 0  # the residual dimension held constant


def make_constant_model(out_dir: str | Path, char: str, seed: int = 0) -> Path:
    out = make_tiny_model(out_dir, seed=seed)
    tok = AutoTokenizer.from_pretrained(out)
    (target,) = tok(char, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, HELD] = 10.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[HELD, :] = 0.0
            layer.mlp.down_proj.weight[HELD, :] = 0.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[HELD] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[target, HELD] = 100.0
    model.save_pretrained(out, safe_serialization=True)
    return out
