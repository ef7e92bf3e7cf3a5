"""Who writes next: the `Policy` interface, its decisions, the rule policies, the registry.

`build_policy(name, params, ensemble)` makes a policy; the coordinator calls
`await policy.decide(view)` once per turn. `antiphon.policies.actor` hosts a policy in a Ray
actor for policies with weights that are updated online.
"""

from antiphon.policies.base import (
    Decision,
    Finish,
    Policy,
    SearchStep,
    WriteSegment,
    WriteUntilDeferral,
    decide,
)
from antiphon.policies.baselines import PolicyParams

REGISTRY_NAMES = ("build_policy", "policy_names", "register_policy", "validate_policy_params")


def __getattr__(name: str):
    # The registry imports every policy, and the switcher's brings torch and transformers: it
    # is loaded on first use, so that a process that only reads decisions (the turn log's)
    # starts without them.
    if name in REGISTRY_NAMES:
        from antiphon.policies import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Decision",
    "Finish",
    "Policy",
    "PolicyParams",
    "SearchStep",
    "WriteSegment",
    "WriteUntilDeferral",
    "build_policy",
    "decide",
    "policy_names",
    "register_policy",
    "validate_policy_params",
]
