"""A policy hosted in a Ray actor, shared by every coordinator replica; `PolicyClient` makes
the actor look like a local `Policy`.

    actor = start_policy_actor("round_robin", {"segment_len": 8})
    policy = PolicyClient.connect(actor)          # a Policy: await policy.decide(view)
    ray.get(actor.set_policy.remote("switch", {...}))   # the next decisions use the new one
    ray.get(actor.reload.remote())      # same parameters, the weights now behind its path

Each `decide` is one actor call; the decision comes back carrying the version of the policy
that made it, so every turn record names what decided it, whatever replaced the policy since.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import ray
from ray.actor import ActorHandle

from antiphon.errors import unwrapped
from antiphon.policies.base import Decision, Policy, decide
from antiphon.policies.baselines import PolicyParams
from antiphon.policies.registry import build_policy, validate_policy_params
from antiphon.sequence import SequenceView


class PolicyActor:
    """Holds one policy; serves `decide` to every coordinator replica."""

    def __init__(self, name: str, params: Mapping[str, object] | None = None) -> None:
        self.set_policy(name, params)

    async def decide(self, view: SequenceView) -> Decision:
        """The decision, stamped with the version of the policy that made it."""
        return await decide(self.policy, view)

    def set_policy(self, name: str, params: Mapping[str, object] | None = None) -> str:
        """Replace the policy (a new rule, new parameters, new weights); return its version.
        Decisions already made keep the version that made them."""
        self.params: PolicyParams = validate_policy_params(name, params)
        self.policy: Policy = build_policy(name, params)
        return self.policy.version

    def reload(self) -> str:
        """Build the policy again from the same parameters and return its version: a switcher
        whose checkpoint path now holds other weights (a policy store's `served` link after a
        promotion) gets them, while requests keep the parameters they were checked against.
        A decision in flight finishes with the policy it started with."""
        return self.set_policy(self.policy.name, self.params.model_dump())

    def describe(self) -> tuple[str, str, PolicyParams]:
        """(name, version, parameters) of the policy held now."""
        return self.policy.name, self.policy.version, self.params


# Named policy actors live here, whoever started them (a driver, Serve's controller)
POLICY_NAMESPACE = "antiphon"


def start_policy_actor(
    name: str, params: Mapping[str, object] | None = None, *, actor_name: str | None = None
) -> ActorHandle:
    """A `PolicyActor` hosting policy `name`. A crashed actor is started again by Ray and the
    decisions in flight are asked again (a decision is a function of the view: asking twice
    is safe), so a crash costs a stall, not a request. A restarted actor holds the policy it
    was started with: a `set_policy` since is gone and must be made again (a `reload` since
    is not: the restarted one reads its checkpoint path anew).

    With `actor_name` the actor is named (in `POLICY_NAMESPACE`) and detached: it outlives
    whoever started it (`serve deploy` returns), a second start gets the running one, and a
    trainer finds it by name to publish a new version."""
    options: dict = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
    if actor_name is not None:
        options |= {"name": actor_name, "namespace": POLICY_NAMESPACE, "lifetime": "detached",
                    "get_if_exists": True}  # fmt: skip
    return ray.remote(PolicyActor).options(**options).remote(name, params)


@dataclass(frozen=True)
class HostedPolicy:
    """A policy to host in a named, detached policy actor, started by whoever needs it first
    (a coordinator replica), so that building an app starts no actor."""

    name: str
    params: Mapping[str, object]
    actor_name: str

    def actor(self) -> ActorHandle:
        """The running actor (started if none), holding these parameters: a redeploy with
        other parameters replaces the policy; one with the same keeps it, and with it any
        version published to it since."""
        actor = start_policy_actor(self.name, self.params, actor_name=self.actor_name)
        _, _, held = ray.get(actor.describe.remote())
        if held != validate_policy_params(self.name, self.params):
            ray.get(actor.set_policy.remote(self.name, self.params))
        return actor


class PolicyClient:
    """A `Policy` whose decisions come from a `PolicyActor`, each with its own version."""

    def __init__(self, actor: ActorHandle, name: str, version: str) -> None:
        self.actor = actor
        self.name = name
        self.version = version  # when connected; each decision carries the one that made it

    @classmethod
    def connect(cls, actor: ActorHandle) -> PolicyClient:
        name, version, _ = ray.get(actor.describe.remote())
        return cls(actor, name, version)

    async def decide(self, view: SequenceView) -> Decision:
        return await unwrapped(self.actor.decide.remote(view))
