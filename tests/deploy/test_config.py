"""Config loading: valid YAML round-trips; every invalid file names the file and the field."""

from __future__ import annotations

import re

import pytest

from antiphon.deploy.config import AppConfig, load_config
from antiphon.deploy.default import DEFAULT_YAML
from antiphon.errors import ConfigError, InvalidRequest

GOOD = """
models:
  - {name: a, path: ckpt-a}
  - {name: b, path: /somewhere/b}
ensembles:
  - name: pair
    models: [a, b]
    policy: {name: round_robin, params: {segment_len: 4}}
serving: {port: 8123, api_key: secret}
"""


def write(tmp_path, text: str, name: str = "antiphon.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_config_loads_with_defaults_and_relative_paths(tmp_path):
    (tmp_path / "ckpt-a").mkdir()
    config = load_config(write(tmp_path, GOOD))
    assert isinstance(config, AppConfig)
    assert config.models[0].path == str((tmp_path / "ckpt-a").resolve())  # relative to the file
    assert config.models[1].path == "/somewhere/b"
    assert config.serving.host == "127.0.0.1"  # never exposed unless asked
    assert config.serving.port == 8123
    assert config.serving.api_key_value() == "secret"
    assert "secret" not in repr(config)  # the key never shows up in logs
    assert config.default_ensemble.name == "pair"
    assert config.ensemble("pair").policy.params == {"segment_len": 4}


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    with pytest.raises(ValueError):
        config.serving.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        (GOOD.replace("models: [a, b]", "models: [a, c]"), "ensembles", "unknown model 'c'"),
        (GOOD.replace("name: round_robin", "name: nope"), "ensembles.0.policy", "unknown policy"),
        (GOOD.replace("segment_len: 4", "segment_len: 0"), "ensembles.0.policy", "segment_len"),
        (GOOD.replace("segment_len: 4", "segment_lenn: 4"), "ensembles.0.policy", "segment_lenn"),
        (GOOD.replace("port: 8123", "port: 99999"), "serving.port", "65535"),
        (GOOD.replace("{name: b, path: /somewhere/b}", "{name: a, path: /x}"), "models", "unique"),
        (GOOD.replace("serving:", "servng:"), "servng", "Extra inputs"),
        (GOOD.replace("{name: a, path: ckpt-a}", "{name: a}"), "models.0.path", "Field required"),
        (
            GOOD.replace("params: {segment_len: 4}", "params: {order: [a, z]}"),
            "ensembles.0",
            "'z'",
        ),
        (  # a switcher deployment of the same app must be one of the config's models
            GOOD.replace(
                "{name: round_robin, params: {segment_len: 4}}",
                "{name: switch, params: {switcher_path: sw, switcher_deployment: sw}}",
            ),
            "ensembles",
            "calls the deployment 'sw', which is not a model of this config",
        ),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path, bad, field, words):
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{field}:" in message
    assert words in message
    assert isinstance(info.value, InvalidRequest)  # a config mistake is the caller's mistake


def test_missing_and_unparsable_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        load_config(write(tmp_path, "models: [\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_shipped_default_yaml_is_valid():
    config = load_config(DEFAULT_YAML)
    assert [m.name for m in config.models] == ["base", "sft", "aligned", "expert", "switcher"]
    assert [e.name for e in config.ensembles] == ["default", "switched"]
    assert config.serving.host == "127.0.0.1" and config.serving.port == 8000


PLACED = GOOD.replace(
    "{name: a, path: ckpt-a}",
    "{name: a, path: ckpt-a, deployment: {resources: {node_a: 1}, accelerator_type: A100,\n"
    "     autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}}}",
).replace("serving: {", "serving: {coordinator_replicas: 2, ingress_replicas: 3, ")


def test_placement_fields_load_and_default_to_anywhere_one_replica(tmp_path):
    config = load_config(write(tmp_path, PLACED))
    a, b = (m.deployment for m in config.models)
    assert a.resources == {"node_a": 1.0} and a.accelerator_type == "A100"
    assert a.autoscaling == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert b.resources == {} and b.accelerator_type is None and b.autoscaling is None
    assert (config.serving.coordinator_replicas, config.serving.ingress_replicas) == (2, 3)
    defaults = load_config(write(tmp_path, GOOD, "defaults.yaml")).serving
    assert (defaults.coordinator_replicas, defaults.ingress_replicas) == (1, 1)


def _a_with(fields: str) -> str:
    return GOOD.replace("{name: a, path: ckpt-a}", "{name: a, path: ckpt-a, " + fields + "}")


DEPLOYMENT = "models.0.deployment"
RESOURCES = f"{DEPLOYMENT}.resources"


def _a_deployed(fields: str) -> str:
    return _a_with("deployment: {" + fields + "}")


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        (
            _a_deployed("resources: {CPU: 1}"),
            RESOURCES,
            "use num_cpus / num_gpus",
        ),
        (
            _a_deployed("resources: {node_a: 1.5}"),
            RESOURCES,
            "above 1 must be whole",
        ),
        (_a_deployed("resources: {node_a: -1}"), RESOURCES, "must be >= 0"),
        (_a_deployed("accelerator_type: ''"), f"{DEPLOYMENT}.accelerator_type", "at least 1"),
        (  # Serve's model ignores unknown keys; ours must not
            _a_deployed("autoscaling: {max_replica: 4}"),
            "models.0.deployment.autoscaling",
            "unknown autoscaling keys ['max_replica']",
        ),
        (  # checked by Serve's own AutoscalingConfig
            _a_deployed("autoscaling: {min_replicas: 3, max_replicas: 2}"),
            "models.0.deployment.autoscaling",
            "AutoscalingConfig refuses it: max_replicas (2) must be greater than or equal",
        ),
        (
            _a_deployed("autoscaling: {max_replicas: many}"),
            "models.0.deployment.autoscaling",
            "max_replicas: Input should be a valid integer",
        ),
        (
            _a_deployed("num_replicas: 2, autoscaling: {max_replicas: 4}"),
            "models.0.deployment",
            "num_replicas (2) and autoscaling exclude each other",
        ),
        (
            GOOD.replace("serving: {", "serving: {ingress_replicas: 0, "),
            "serving.ingress_replicas",
            "greater than or equal to 1",
        ),
        (
            GOOD.replace("serving: {", "serving: {coordinator_replicas: 0, "),
            "serving.coordinator_replicas",
            "greater than or equal to 1",
        ),
    ],  # fmt: skip
)
def test_invalid_placement_names_file_and_field(tmp_path, bad, field, words):
    path = write(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and f"{field}:" in message and words in message


@pytest.mark.parametrize(
    "fields",
    [
        "deployment: {resources: {node_a: 1}}",
        "deployment: {accelerator_type: A100}",
        "deployment: {autoscaling: {max_replicas: 2}}",
    ],  # fmt: skip
)
def test_placement_is_refused_beside_an_endpoint(tmp_path, fields):
    endpoint = "endpoint: {base_url: 'http://host:8000/v1', model: m}"
    with pytest.raises(ConfigError, match="reached through its endpoint and has no deployment"):
        load_config(write(tmp_path, _a_with(f"{endpoint}, {fields}")))


COLOCATED = """
models:
  - {name: a, path: /ckpt/a, deployment: {num_gpus: 0.5, resources: {node_a: 1}}}
  - {name: b, path: /ckpt/b, deployment: {num_gpus: 0.25, num_cpus: 1, resources: {node_a: 1}}}
ensembles:
  - {name: pair, models: [a, b]}
serving: {colocate_models: true, coordinator_replicas: 2}
"""


def test_colocated_models_give_their_resources_to_the_coordinator_replica(tmp_path):
    from antiphon.actors.server import actor_options

    config = load_config(write(tmp_path, COLOCATED))
    assert config.serving.colocate_models
    assert actor_options(config.models) == {
        "num_cpus": 1.0, "num_gpus": 0.75, "resources": {"node_a": 2.0}
    }  # fmt: skip
    assert not load_config(write(tmp_path, GOOD)).serving.colocate_models  # the default


@pytest.mark.parametrize(
    "change, words",
    [
        ("  - {name: c, path: /ckpt/c, deployment: {num_replicas: 2}}",
         "models[2].deployment: with serving.colocate_models, model 'c' runs inside each"),
        ("  - {name: c, path: /ckpt/c, deployment: {autoscaling: {max_replicas: 4}}}",
         "scale it with serving.coordinator_replicas"),
        ("  - {name: c, path: /ckpt/c, deployment: {accelerator_type: H100}}\n"
         "  - {name: d, path: /ckpt/d, deployment: {accelerator_type: A100}}",
         "different accelerator types (A100, H100)"),
    ],
)  # fmt: skip
def test_colocated_models_refuse_deployment_knobs_they_cannot_honour(tmp_path, change, words):
    text = COLOCATED.replace("ensembles:", change + "\nensembles:")
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(write(tmp_path, text))


def test_colocated_models_refuse_a_policy_that_calls_a_deployment(tmp_path):
    text = """
models:
  - {name: a, path: /ckpt/a}
  - {name: b, path: /ckpt/b}
ensembles:
  - name: switched
    models: [a, b]
    policy: {name: switch, params: {switcher_path: /ckpt/a, switcher_deployment: a}}
serving: {colocate_models: true}
"""
    with pytest.raises(ConfigError, match="calls the deployment 'a', but with serving.colocate"):
        load_config(write(tmp_path, text))
    allowed = text.replace(", switcher_deployment: a", "")  # the switcher in the coordinator
    assert load_config(write(tmp_path, allowed)).serving.colocate_models
