"""A minimal LoRA in plain torch (no peft): low-rank adapters on chosen linear layers,
merged back into the weights before saving, so the result is a plain HF checkpoint.

    adapters = add_lora(model, targets=("q_proj", "v_proj"), r=64, alpha=16)
    ...train only `adapters`...
    merge_lora(model)            # W += (alpha / r) * B @ A; the LoRA modules are gone
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T, with A (r, in) random and B (out, r) zero, so
    training starts from the base model exactly."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        self.scale = alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_lora(
    model: nn.Module, targets: Sequence[str] = ("q_proj", "v_proj"), r: int = 16, alpha: float = 16
) -> list[nn.Parameter]:
    """Freeze the model and wrap every nn.Linear whose name ends with a target; return the
    adapters' parameters (the only trainable ones)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: list[nn.Parameter] = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in targets:
                lora = LoRALinear(child, r, alpha)
                setattr(module, child_name, lora)
                wrapped += [lora.lora_a, lora.lora_b]
    if not wrapped:
        raise ValueError(f"no linear layer named any of {list(targets)} in the model")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and unwrap it; unfreeze the model."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
