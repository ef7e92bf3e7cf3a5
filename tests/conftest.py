"""Fixtures shared by the whole suite: one local Ray cluster, tiny checkpoints on disk."""

from __future__ import annotations

import os

import pytest

from antiphon.training.switcher_training import SwitcherTrainConfig, train_switcher
from tests.factories import make_tiny_model
from tests.switch_models import examples

# Ray 2.60 turns token auth on for new local clusters; tests run their own cluster without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# An API key the suite's Ray workers inherit (set before the cluster starts), as a cluster's
# secret would be: a config naming it by `serving.api_key_env` reads it in the ingress.
BUILT_APP_KEY_ENV = "ANTIPHON_TEST_BUILT_APP_KEY"
BUILT_APP_KEY = "built-app-key"
os.environ[BUILT_APP_KEY_ENV] = BUILT_APP_KEY


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


@pytest.fixture(scope="session")
def trained_switcher(tiny_model_dir, tmp_path_factory):
    """A switcher trained (from the tiny checkpoint) on examples whose best is always model 1."""
    out = tmp_path_factory.mktemp("switcher")
    cfg = SwitcherTrainConfig(epochs=3, batch_size=8, lr=1e-3, val_fraction=0.25)
    report = train_switcher(examples(40), str(tiny_model_dir), out, cfg, progress=False)
    return out, report


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir, other_tiny_model_dir, trained_switcher, tmp_path_factory):
    """The real antiphon HTTP server of tests/deploy/server.py (deployed once, reused)."""
    from tests.deploy.server import ensure_server

    work_dir = tmp_path_factory.mktemp("serve")
    return ensure_server(tiny_model_dir, other_tiny_model_dir, trained_switcher[0], work_dir)
