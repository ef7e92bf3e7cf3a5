"""Checkpoints with known behaviour for the Switch Generation tests (real HF checkpoints,
loaded through the ordinary loader).

`make_constant_model(dir, "X")` writes a Llama whose greedy output is always the character
X, whatever the context: one residual dimension is held at a constant by the embeddings
(no layer writes to it), the final norm keeps only that dimension, and the output head reads
it into X's logit alone. Texts of an ensemble of such models say exactly who wrote what.

`examples(n, label)` makes hand-made rollout examples whose best candidate is always `label`.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from antiphon.training.rollouts import RolloutExample
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
