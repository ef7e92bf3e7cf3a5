"""The learned switcher on a cluster: its checkpoint as a model deployment of its own
(resources from its `ModelSpec`: e.g. an 8B instruct model with a merged LoRA on one GPU), and
the `switch` policy hosted in a policy actor that calls it once per turn.

    from ray import serve
    spec = ModelSpec(name="switcher", path="runs/switcher", deployment={"num_gpus": 1})
    actor = deploy_switch_policy(spec, {"segment_len": 32})
    app = build_coordinator_app(model_specs, "runs/turns.atl", {"switch": actor})  # deploy.app
    serve.run(app, name="antiphon", route_prefix=None)
"""

from __future__ import annotations

from collections.abc import Mapping

from ray import serve
from ray.actor import ActorHandle

from antiphon.actors.server import build_model_deployment
from antiphon.config import ModelSpec
from antiphon.policies.actor import start_policy_actor

SWITCHER_APP = "switcher"


def switch_policy_params(spec: ModelSpec, params: Mapping[str, object] | None = None) -> dict:
    """The `switch` parameters that point the policy at the switcher's deployment."""
    return {
        **dict(params or {}),
        "switcher_path": spec.path,
        "switcher_deployment": spec.name,
        "switcher_app": SWITCHER_APP,
    }


def deploy_switch_policy(
    spec: ModelSpec, params: Mapping[str, object] | None = None
) -> ActorHandle:
    """Run the switcher's model deployment (Serve app 'switcher') and a policy actor hosting
    `switch` over it; return the actor (pass it to the coordinator as {"switch": actor})."""
    serve.run(build_model_deployment(spec), name=SWITCHER_APP, route_prefix=None)
    return start_policy_actor("switch", switch_policy_params(spec, params))
