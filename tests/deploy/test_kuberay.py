"""The KubeRay manifests in deploy/kuberay: their Kubernetes parts (every pod template)
validated by `kubernetes-validate` against the Kubernetes schema, their embedded Serve config
by Serve's own schema and equal to what `antiphon build` makes of the GPU config, that config
by antiphon's loader, and the job's command by antiphon's command line."""

from __future__ import annotations

import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from antiphon.cli import build_parser
from antiphon.deploy.config import load_config, parse_config
from antiphon.deploy.serve_config import serve_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GPU_CONFIG = DEPLOY / "gpu" / "tulu3-8b.yaml"
KUBERNETES = "1.33.0"  # what current managed clusters run


def manifest(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "kuberay" / name).read_text())


def pod_templates(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [group["template"] for group in groups]


@pytest.mark.parametrize(("name", "cluster_key"), [
    ("rayservice.yaml", "rayClusterConfig"), ("rayjob.yaml", "rayClusterSpec")])  # fmt: skip
def test_every_pod_template_is_a_valid_kubernetes_pod_template(name, cluster_key):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    for template in pod_templates(doc["spec"][cluster_key]):
        as_object = {"apiVersion": "v1", "kind": "PodTemplate",
                     "metadata": {"name": "t"}, "template": template}  # fmt: skip
        kubernetes_validate.validate(as_object, KUBERNETES, strict=True)  # raises if not


def test_a_broken_pod_template_is_caught():
    """The check above can fail: a container without an image is refused."""
    template = pod_templates(manifest("rayservice.yaml")["spec"]["rayClusterConfig"])[0]
    del template["spec"]["containers"][0]["image"]
    del template["spec"]["containers"][0]["name"]
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
              "template": template}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_service_serves_what_antiphon_build_makes_of_the_gpu_config():
    embedded = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    config = load_config(GPU_CONFIG)
    assert embedded == serve_config(config)
    assert parse_config(embedded["applications"][0]["args"]["config"]) == config


def test_the_gpu_config_places_each_checkpoint_on_its_own_gpu_in_bf16():
    config = load_config(GPU_CONFIG)
    assert [m.name for m in config.models] == ["base", "sft", "aligned", "switcher"]
    assert all(m.deployment.num_gpus == 1 and m.dtype == "bfloat16" and m.device == "cuda"
               for m in config.models)  # fmt: skip
    workers = manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                   ["nvidia.com/gpu"]) for g in workers)  # fmt: skip
    assert gpus >= sum(m.deployment.num_gpus for m in config.models)


@pytest.mark.parametrize(("name", "cluster_key"), [
    ("rayservice.yaml", "rayClusterConfig"), ("rayjob.yaml", "rayClusterSpec")])  # fmt: skip
def test_every_node_runs_with_token_auth_and_the_api_key_from_a_secret(name, cluster_key):
    key_env = load_config(GPU_CONFIG).serving.api_key_env
    for template in pod_templates(manifest(name)["spec"][cluster_key]):
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
            assert "secretKeyRef" in env[key_env]["valueFrom"]


def test_the_jobs_command_is_an_antiphon_command():
    argv = shlex.split(manifest("rayjob.yaml")["spec"]["entrypoint"])
    assert argv[0] == "antiphon"
    args = build_parser().parse_args(argv[1:])
    assert args.run.__name__ == "cmd_eval" and args.url and args.ensemble == "switched"
