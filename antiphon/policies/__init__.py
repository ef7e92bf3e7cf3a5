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
from antiphon.policies.registry import (
    build_policy,
    policy_names,
    register_policy,
    validate_policy_params,
)

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
