"""The shared test server for the deploy tests (see tests/deploy/server.py)."""

from __future__ import annotations

import pytest

from tests.deploy.server import RunningServer, ensure_server


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir, other_tiny_model_dir, tmp_path_factory) -> RunningServer:
    return ensure_server(tiny_model_dir, other_tiny_model_dir, tmp_path_factory.mktemp("serve"))
