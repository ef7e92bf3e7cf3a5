"""`trained_router`: one model for the whole response, chosen from the query alone by a
linear classifier over hashed character n-grams of the prompt (trained on dev outcomes by
`antiphon.training.router_training`).

    build_policy("trained_router", {"weights": "runs/router"}, ensemble=("base", "sft", "aligned"))

The weights directory holds `router.safetensors` (weight (n, dim), bias (n,)) and
`router.json` (the model names in output order, the feature settings).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from antiphon.checkpoint import weights_fingerprint
from antiphon.errors import InvalidRequest, NotFound
from antiphon.policies.base import Decision, WriteSegment
from antiphon.policies.baselines import PolicyParams
from antiphon.sequence import SequenceView

WEIGHTS_FILE = "router.safetensors"
META_FILE = "router.json"


def query_features(prompt: str, dim: int, max_n: int = 3) -> torch.Tensor:
    """(dim,) L2-normalised counts of the prompt's character 1..max_n-grams, hashed."""
    x = torch.zeros(dim)
    for n in range(1, max_n + 1):
        for i in range(len(prompt) - n + 1):
            x[zlib.crc32(prompt[i : i + n].encode()) % dim] += 1.0
    return x / x.norm().clamp(min=1e-6)


@dataclass
class RouterWeights:
    models: tuple[str, ...]  # output i scores models[i]
    weight: torch.Tensor  # (n, dim)
    bias: torch.Tensor  # (n,)
    max_n: int  # n-gram sizes 1..max_n

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def logits(self, prompt: str) -> torch.Tensor:
        """(n,) the router's score of each model for this prompt."""
        return self.weight @ query_features(prompt, self.dim, self.max_n) + self.bias

    def route(self, prompt: str) -> str:
        return self.models[int(self.logits(prompt).argmax())]

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()},
                  out / WEIGHTS_FILE)  # fmt: skip
        (out / META_FILE).write_text(json.dumps({"models": list(self.models), "max_n": self.max_n}))
        return out

    @classmethod
    def load(cls, path: str | Path) -> RouterWeights:
        path = Path(path)
        if not (path / WEIGHTS_FILE).is_file() or not (path / META_FILE).is_file():
            raise NotFound(f"no router weights at {path} (need {WEIGHTS_FILE} and {META_FILE})")
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(path / WEIGHTS_FILE)
        return cls(tuple(meta["models"]), tensors["weight"], tensors["bias"], int(meta["max_n"]))


class TrainedRouterParams(PolicyParams):
    config_only: ClassVar[frozenset[str]] = frozenset({"weights"})

    weights: str = Field(min_length=1, description="Directory of the router's weights.")
    segment_len: int = Field(default=32, ge=1, description="Tokens per segment (streaming unit).")


class TrainedRouter:
    """Routes the whole response to the model the classifier scores highest for the prompt."""

    name = "trained_router"

    def __init__(self, params: TrainedRouterParams) -> None:
        self.params = params
        self.router = RouterWeights.load(params.weights)
        self.version = weights_fingerprint(params.weights)  # read once: built once

    async def decide(self, view: SequenceView) -> Decision:
        model = self.router.route(view.prompt)
        if model not in view.models:
            raise InvalidRequest(
                f"trained_router picked {model!r}, which is not in the ensemble "
                f"{list(view.models)}; it was trained for {list(self.router.models)}"
            )
        return WriteSegment(model, self.params.segment_len)
