"""Switch generation end to end on a real local Ray cluster: the constant models "x" and "y"
as model deployments, the trained switcher (it prefers model 1, "y") in a deployment of its
own, the `switch` policy hosted in a policy actor, the coordinator deployment over them."""

from __future__ import annotations

import pytest
import ray
from ray import serve

from antiphon.config import ModelSpec
from antiphon.coordinator.request import GenerationRequest
from antiphon.deploy.app import build_coordinator_app
from antiphon.deploy.switcher import SWITCHER_APP, deploy_switch_policy, switch_policy_params

pytestmark = pytest.mark.slow

APP = "test-switch"
PARAMS = {"segment_len": 4, "first_model": "x"}


@pytest.fixture(scope="module")
def served(ray_cluster, constant_dirs, trained_switcher):
    switcher_dir, _ = trained_switcher
    spec = ModelSpec(name="switcher-model", path=str(switcher_dir))
    actor = deploy_switch_policy(spec, PARAMS)
    specs = [ModelSpec(name=n, path=str(constant_dirs[n])) for n in ("x", "y")]
    handle = serve.run(build_coordinator_app(specs, None, {"switch": actor}), name=APP,
                       route_prefix=None)  # fmt: skip
    yield handle, switch_policy_params(spec, PARAMS)
    serve.delete(APP)
    serve.delete(SWITCHER_APP)
    ray.kill(actor)


def test_switch_generation_through_ray_follows_the_switcher(served):
    handle, params = served
    request = GenerationRequest(
        prompt="Q: who writes?\nA:", models=("x", "y"), policy="switch", policy_params=params,
        max_tokens=14,
    )  # fmt: skip
    result = handle.generate.remote(request).result()
    # first segment forced to x; then the switcher picks y (index 1) every turn
    assert [s.model for s in result.segments] == ["x", "y", "y", "y"]
    assert result.text == "XXXX" + "y" * 10
    assert result.policy == "switch" and result.policy_version != "unknown"


def test_rollouts_over_the_serving_deployments_label_the_known_best(ray_cluster, constant_dirs,
                                                                      tmp_path):  # fmt: skip
    """`antiphon train switcher --ray`: the models and a coordinator as Serve deployments on
    the cluster, every rollout a request to it; labels as in-process ("y" is best)."""
    import asyncio

    from antiphon.experiments.train_switcher import ROLLOUT_APP, ray_coordinator
    from antiphon.training.rollouts import RolloutConfig, RolloutStore, run_rollouts
    from tests.training.test_rollouts import QUERIES

    generate = ray_coordinator([(n, str(constant_dirs[n])) for n in ("x", "y")])
    try:
        cfg = RolloutConfig(k=2, segment_len=4, prefixes_per_query=2, empty_first_prefix=True)
        examples = asyncio.run(run_rollouts(generate, QUERIES, ("x", "y"), cfg,
                                            RolloutStore(tmp_path), progress=False))  # fmt: skip
    finally:
        serve.delete(ROLLOUT_APP)
    assert len(examples) == 2 * len(QUERIES)
    assert all(ex.best == [1] and ex.label == 1 for ex in examples)
