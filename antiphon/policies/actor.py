"""A policy hosted in a Ray actor, for policies that own weights and pick up new ones online
(the learned switcher); `PolicyClient` makes the actor look like a local `Policy`.

    actor = ray.remote(PolicyActor).options(num_cpus=0).remote("round_robin", {"segment_len": 8})
    policy = PolicyClient.connect(actor)          # a Policy: await policy.decide(view)
    ray.get(actor.load_weights.remote("/ckpt/step-200"))   # next decisions use them

Each `decide` is one actor call; the reply carries the policy version, so every turn record
names the weights that made its decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import ray
from ray.actor import ActorHandle

from antiphon.coordinator.state import SequenceView
from antiphon.errors import InvalidRequest
from antiphon.policies.base import Decision, Policy
from antiphon.policies.baselines import PolicyParams
from antiphon.policies.registry import build_policy, validate_policy_params


@runtime_checkable
class LoadsWeights(Protocol):
    """A policy with weights; `load_weights` swaps them in and returns the new version."""

    def load_weights(self, checkpoint: str) -> str: ...


class PolicyActor:
    """Holds one policy; serves `decide` to every coordinator replica."""

    def __init__(self, name: str, params: Mapping[str, object] | None = None) -> None:
        self.set_policy(name, params)

    async def decide(self, view: SequenceView) -> tuple[Decision, str]:
        """The decision and the version of the policy that made it."""
        return await self.policy.decide(view), self.policy.version

    def set_policy(self, name: str, params: Mapping[str, object] | None = None) -> str:
        """Replace the policy (a new rule, new parameters); return its version."""
        self.params: PolicyParams = validate_policy_params(name, params)
        self.policy: Policy = build_policy(name, params)
        return self.policy.version

    def load_weights(self, checkpoint: str) -> str:
        """Load new weights into the policy (a checkpoint directory); return the new version."""
        if not isinstance(self.policy, LoadsWeights):
            raise InvalidRequest(f"policy {self.policy.name!r} has no weights to load")
        return self.policy.load_weights(checkpoint)

    def describe(self) -> tuple[str, str, PolicyParams]:
        """(name, version, parameters) of the policy held now."""
        return self.policy.name, self.policy.version, self.params


class PolicyClient:
    """A `Policy` whose decisions come from a `PolicyActor`."""

    def __init__(self, actor: ActorHandle, name: str, version: str) -> None:
        self.actor = actor
        self.name = name
        self.version = version  # of the last decision (updated by every reply)

    @classmethod
    def connect(cls, actor: ActorHandle) -> PolicyClient:
        name, version, _ = ray.get(actor.describe.remote())
        return cls(actor, name, version)

    async def decide(self, view: SequenceView) -> Decision:
        decision, self.version = await self.actor.decide.remote(view)
        return decision
