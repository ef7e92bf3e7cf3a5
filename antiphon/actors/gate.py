"""The deferral gate: an extra linear head on a checkpoint's last hidden state (Co-LLM).

gate_t = sigmoid(w . h_t + b), where h_t is the hidden state the LM head reads at position t
(the final-norm output) and the gate decides whether the token chosen from that position's
logits should be written by another model. The gate is stored next to the checkpoint as
`gate.safetensors` with tensors 'weight' (hidden,) and optionally 'bias' () -- the Co-LLM
trainer writes it with `save_gate`, the engine reads it with `load_gate`.

A gate can change while the engine serves: `GateSource` re-reads the file when the path it
resolves to moves (an online trainer promotes a gate by moving a policy store's `served`
link, and a store's versions never change in place). Each generate call takes the gate of
the moment it starts and keeps it to its end, and its result names that gate.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from antiphon.checkpoint import resolve_checkpoint_path
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest
from antiphon.logging import get_logger

log = get_logger(__name__)

GATE_FILENAME = "gate.safetensors"


@dataclass(frozen=True)
class GateHead:
    """A loaded gate: weight (hidden,) and bias () in float32 on the model's device, and the
    fingerprint of the file it came from (what turn records and /v1/models name it by)."""

    weight: torch.Tensor
    bias: torch.Tensor
    fingerprint: str = ""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate values in [0, 1] for hidden states (..., hidden) -> (...,), float32."""
        return torch.sigmoid(hidden.float() @ self.weight + self.bias)

    def to(self, device: torch.device | str) -> GateHead:
        return GateHead(self.weight.to(device), self.bias.to(device), self.fingerprint)


def save_gate(path: str | Path, weight: torch.Tensor, bias: float | torch.Tensor = 0.0) -> Path:
    """Write a gate file; `path` is the file, or a checkpoint directory (gate.safetensors)."""
    out = Path(path)
    if out.is_dir():
        out = out / GATE_FILENAME
    weight = weight.detach().float().reshape(-1).contiguous().cpu()
    bias_t = torch.as_tensor(bias, dtype=torch.float32).detach().reshape(()).cpu()
    save_file({"weight": weight, "bias": bias_t}, str(out))
    return out


def load_gate(path: str | Path, hidden_size: int) -> GateHead:
    """Read a gate file, checking that its weight matches the model's hidden size."""
    tensors = load_file(str(path))
    if "weight" not in tensors:
        raise InvalidRequest(f"gate file {path} has no 'weight' tensor")
    weight = tensors["weight"].float().reshape(-1)
    if weight.numel() != hidden_size:
        raise InvalidRequest(
            f"gate file {path}: weight has {weight.numel()} values, the model's hidden size is "
            f"{hidden_size}"
        )
    bias = tensors.get("bias", torch.zeros(())).float().reshape(())
    return GateHead(weight, bias, gate_fingerprint(path))


def gate_fingerprint(path: str | Path) -> str:
    """A short hash of a gate file's bytes (a gate is a few KB: the whole file is read)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def find_gate(spec: ModelSpec) -> Path | None:
    """The gate file of a checkpoint: spec.gate_path, else gate.safetensors beside the
    weights, else None (the checkpoint has no gate)."""
    if spec.gate_path is not None:
        return Path(spec.gate_path)
    candidate = Path(resolve_checkpoint_path(spec.path)) / GATE_FILENAME
    return candidate if candidate.is_file() else None


class GateSource:
    """A checkpoint's gate, re-read when its file's resolved path moves (see the module
    docstring). A file that cannot be read, or does not fit the model, leaves the gate
    served before in place (logged): a bad publication must not fail the requests."""

    def __init__(self, path: Path, hidden_size: int, device: torch.device | str) -> None:
        self.path, self.hidden_size, self.device = path, hidden_size, device
        self.resolved = os.path.realpath(path)
        self.gate = load_gate(path, hidden_size).to(device)

    def current(self) -> GateHead:
        """The gate to use from now on: the file's, if the path resolves elsewhere now."""
        resolved = os.path.realpath(self.path)
        if resolved != self.resolved:
            try:
                self.gate = load_gate(resolved, self.hidden_size).to(self.device)
                log.info("gate reloaded", path=str(self.path), gate=self.gate.fingerprint)
            except Exception as e:  # a missing, torn or misshapen file: keep serving
                log.error("gate not reloaded, the one before is kept", path=resolved, error=str(e))
            self.resolved = resolved  # tried once: a bad file is not read again each call
        return self.gate
