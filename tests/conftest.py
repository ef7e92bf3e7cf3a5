"""Fixtures shared by the whole suite: one local Ray cluster, tiny checkpoints on disk."""

from __future__ import annotations

import os

import pytest

from tests.factories import make_tiny_model

# Ray 2.60 turns token auth on for new local clusters; tests run their own cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight Llama checkpoint with a character tokenizer, saved in HF format."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory):
    """A second random checkpoint of the same shape and tokenizer (different weights)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model-b"), seed=1)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (ray.init costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            object_store_memory=256 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
