"""A model deployment's Serve options come from its spec, and Serve itself accepts them."""

from __future__ import annotations

import pytest
from ray import serve

from antiphon.actors.server import ModelServer, deployment_options
from antiphon.config import ModelSpec


def spec(**deployment: object) -> ModelSpec:
    return ModelSpec(name="m", path="/nowhere", deployment=deployment)


def test_plain_spec_runs_its_replicas_anywhere():
    options = deployment_options(spec(num_replicas=2, num_cpus=1.0))
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_placement_goes_into_ray_actor_options():
    options = deployment_options(spec(num_gpus=1, resources={"node_a": 1}, accelerator_type="H100"))
    assert options["ray_actor_options"] == {
        "num_cpus": 0.0,
        "num_gpus": 1.0,
        "resources": {"node_a": 1.0},
        "accelerator_type": "H100",
    }
    deployment = serve.deployment(ModelServer, **options)  # Serve checks the options here
    assert deployment.ray_actor_options["resources"] == {"node_a": 1.0}
    assert deployment.ray_actor_options["accelerator_type"] == "H100"


def test_autoscaling_replaces_the_replica_count():
    autoscaling = {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 4}
    options = deployment_options(spec(autoscaling=autoscaling))
    assert options["autoscaling_config"] == autoscaling and "num_replicas" not in options
    # Serve refuses num_replicas beside an autoscaling config; these it takes
    serve.deployment(ModelServer, **options)
    with pytest.raises(ValueError, match="num_replicas is not allowed"):
        serve.deployment(ModelServer, **options, num_replicas=2)
