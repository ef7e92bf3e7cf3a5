"""A tiny zoo, trained once per test session by the real build code (seconds)."""

from __future__ import annotations

import pytest
import torch

from antiphon.zoo.build import build_zoo


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    torch.set_num_threads(1)
    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", "tiny", seed=0)
