"""The app builder validates its whole input before anything starts (no cluster needed)."""

from __future__ import annotations

import pytest
from ray.serve.deployment import Application

from antiphon.deploy.app import app_builder, build_app, turn_log_actor_name_for
from antiphon.errors import ConfigError


def test_build_app_from_a_dict_validates_it_once(tiny_model_dir):
    good = {
        "models": [{"name": "a", "path": str(tiny_model_dir)}],
        "ensembles": [{"name": "solo", "models": ["a"]}],
    }
    assert isinstance(build_app(good), Application)
    bad = {**good, "ensembles": [{"name": "solo", "models": ["a", "ghost"]}]}
    with pytest.raises(ConfigError, match="unknown model 'ghost'"):
        build_app(bad)


def test_serve_builder_reads_a_config_file(tmp_path, tiny_model_dir):
    path = tmp_path / "app.yaml"
    path.write_text(
        f"models: [{{name: a, path: {tiny_model_dir}}}]\nensembles: [{{name: e, models: [a]}}]\n"
    )
    assert isinstance(app_builder({"config": str(path)}), Application)
    with pytest.raises(ConfigError, match="cannot read config"):
        app_builder({"config": str(tmp_path / "missing.yaml")})


def test_one_turn_log_actor_per_log_file():
    assert turn_log_actor_name_for("/a/turns.atl") == turn_log_actor_name_for("/a/turns.atl")
    assert turn_log_actor_name_for("/a/turns.atl") != turn_log_actor_name_for("/b/turns.atl")
