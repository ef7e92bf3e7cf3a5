"""A policy hosted in a Ray actor, shared by every coordinator replica; `PolicyClient` makes
the actor look like a local `Policy`.

    actor = start_policy_actor("round_robin", {"segment_len": 8})
    policy = PolicyClient.connect(actor)          # a Policy: await policy.decide(view)
    ray.get(actor.set_policy.remote("switch", {...}))   # the next decisions use the new one

Each `decide` is one actor call; the decision comes back carrying the version of the policy
that made it, so every turn record names what decided it, whatever replaced the policy since.
"""

from __future__ import annotations

from collections.abc import Mapping

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

    def describe(self) -> tuple[str, str, PolicyParams]:
        """(name, version, parameters) of the policy held now."""
        return self.policy.name, self.policy.version, self.params


def start_policy_actor(name: str, params: Mapping[str, object] | None = None) -> ActorHandle:
    """A `PolicyActor` hosting policy `name`. A crashed actor is started again by Ray and the
    decisions in flight are asked again (a decision is a function of the view: asking twice
    is safe), so a crash costs a stall, not a request. A restarted actor holds the policy it
    was started with: a `set_policy` since is gone and must be made again."""
    return (
        ray.remote(PolicyActor)
        .options(num_cpus=0, max_restarts=-1, max_task_retries=-1)
        .remote(name, params)
    )


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
