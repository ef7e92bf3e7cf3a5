"""`antiphon build`: a standard Serve config file for a config, checked against Serve's own
schema, that `serve run` takes unchanged and deploys on a running cluster (here the suite's),
with the API key read from an environment variable where the ingress runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from antiphon.deploy.config import parse_config
from antiphon.deploy.serve_config import APP_BUILDER, serve_config
from antiphon.errors import ConfigError
from tests.conftest import BUILT_APP_KEY, BUILT_APP_KEY_ENV
from tests.deploy.server import http_url

APP = "antiphon-built"
PREFIX = "/antiphon-built"


def pair_config(model_a, model_b, turn_log, **serving) -> dict:
    return {
        "models": [{"name": "a", "path": str(model_a)}, {"name": "b", "path": str(model_b)}],
        "ensembles": [{"name": "pair", "models": ["a", "b"],
                       "policy": {"name": "round_robin", "params": {"segment_len": 3}}}],
        "serving": {"turn_log_path": str(turn_log), "default_max_tokens": 9, **serving},
    }  # fmt: skip


def test_the_file_is_a_serve_config_holding_the_config_it_was_built_from(
    tiny_model_dir, other_tiny_model_dir, tmp_path
):
    config = parse_config(pair_config(tiny_model_dir, other_tiny_model_dir, tmp_path / "t.atl"))
    file = serve_config(config, app_name=APP, route_prefix=PREFIX)
    ServeDeploySchema.model_validate(file)
    (app,) = file["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (APP, PREFIX, APP_BUILDER)
    assert parse_config(app["args"]["config"]) == config  # inline: the file stands alone
    assert "max_sessions" not in app["args"]["config"]["models"][0]  # only what was set


def test_a_literal_api_key_is_not_copied_into_the_file(tiny_model_dir, other_tiny_model_dir):
    keyed = pair_config(tiny_model_dir, other_tiny_model_dir, "t.atl", api_key="secret")
    with pytest.raises(ConfigError, match="set serving.api_key_env"):
        serve_config(parse_config(keyed))
    both = pair_config(tiny_model_dir, other_tiny_model_dir, "t.atl", api_key="s",
                       api_key_env="KEY")  # fmt: skip
    with pytest.raises(ConfigError, match="give api_key or api_key_env, not both"):
        parse_config(both)


def test_an_api_key_env_that_is_not_set_is_named(monkeypatch):
    monkeypatch.delenv("ANTIPHON_NO_SUCH_KEY", raising=False)
    serving = parse_config(
        {"models": [{"name": "a", "path": "zoo:base"}],
         "ensembles": [{"name": "e", "models": ["a"]}],
         "serving": {"api_key_env": "ANTIPHON_NO_SUCH_KEY"}}
    ).serving  # fmt: skip
    with pytest.raises(ConfigError, match="'ANTIPHON_NO_SUCH_KEY' .* is not set"):
        serving.api_key_value()
    monkeypatch.setenv("ANTIPHON_NO_SUCH_KEY", "k")
    assert serving.api_key_value() == "k"


@pytest.mark.slow
def test_serve_run_deploys_the_built_file_on_a_running_cluster(
    ray_cluster, server, tiny_model_dir, other_tiny_model_dir, tmp_path
):
    """`server`: Serve already runs on the suite's cluster (its proxy's port is the one the
    file's http_options cannot change); the built app goes beside the test app."""
    source = tmp_path / "antiphon.yaml"
    cfg = pair_config(tiny_model_dir, other_tiny_model_dir, tmp_path / "t.atl",
                      api_key_env=BUILT_APP_KEY_ENV)  # fmt: skip
    source.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "serve.yaml"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    built = subprocess.run(
        [sys.executable, "-m", "antiphon.cli", "build", str(source), "-o", str(out),
         "--name", APP, "--route-prefix", PREFIX],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    address = ray.get_runtime_context().gcs_address
    ran = subprocess.run(
        ["serve", "run", "--non-blocking", "--address", address, str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    try:
        assert ran.returncode == 0, ran.stderr[-3000:]
        url = http_url(PREFIX)
        body = {"prompt": "Once upon a time", "ensemble": "pair"}
        keyed = {"Authorization": f"Bearer {BUILT_APP_KEY}"}
        deadline = time.monotonic() + 120
        while True:  # serve run --non-blocking returns before the app is up
            try:
                answer = httpx.post(f"{url}/v1/generate", json=body, timeout=60, headers=keyed)
                if answer.status_code != 404 or time.monotonic() > deadline:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1)
        assert answer.status_code == 200, answer.text
        assert {s["model"] for s in answer.json()["segments"]} == {"a", "b"}
        keyless = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
        assert keyless.status_code == 401  # the key came from the ingress's environment
    finally:
        serve.delete(APP)
