"""Every turn record names the policy version that made its decision, even when the hosted
policy's weights are swapped while requests are in flight (a real Ray policy actor, trained
routers whose weights route every prompt to a different model, scripted writers)."""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch

from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.records import TurnRecord
from antiphon.policies.actor import PolicyClient, start_policy_actor
from antiphon.policies.registry import PolicyCache
from antiphon.policies.router import RouterWeights
from antiphon.training.turn_log import FileTurnSink, TurnLogWriter, read_records
from tests.factories import make_request
from tests.fakes import TOKENIZER, ScriptedModel

TEXT = "a long answer that takes many turns to write down in full"


def router_to(model: str, out_dir) -> str:
    """Router weights that send every prompt to `model` (of a, b)."""
    bias = torch.tensor([1.0, 0.0] if model == "a" else [0.0, 1.0])
    return str(RouterWeights(("a", "b"), torch.zeros(2, 16), bias, max_n=1).save(out_dir))


def test_a_weight_swap_mid_flight_labels_every_turn_with_the_weights_that_decided_it(
    ray_cluster, tmp_path
):
    to_a, to_b = router_to("a", tmp_path / "to-a"), router_to("b", tmp_path / "to-b")
    params = {"segment_len": 2}
    actor = start_policy_actor("trained_router", {"weights": to_a, **params})
    try:
        client = PolicyClient.connect(actor)
        version_a = client.version
        models = {n: ScriptedModel(n, text=TEXT) for n in "ab"}
        writer = TurnLogWriter(tmp_path / "turns.atl")
        coord = Coordinator(
            models,
            {n: TOKENIZER for n in models},
            resolve_policy=lambda name, p, ensemble: client,
            turn_sink=FileTurnSink(writer),
        )
        requests = [make_request(max_tokens=16, request_id=f"r{i}") for i in range(6)]

        async def swapped_midway() -> str:
            stream = coord.run(requests[0])
            await anext(stream)  # r0's first turn is out; its next decision waits for us
            version_b = await actor.set_policy.remote("trained_router", {"weights": to_b, **params})
            async for _ in stream:
                pass
            return version_b

        async def run_all():
            return await asyncio.gather(
                swapped_midway(), *(coord.generate(r) for r in requests[1:])
            )

        version_b, *_ = asyncio.run(run_all())
    finally:
        ray.kill(actor)
    assert version_a != version_b
    turns = [r for r, _ in read_records(tmp_path / "turns.atl") if isinstance(r, TurnRecord)]
    assert len(turns) == 6 * 8  # every request wrote its 16 tokens, 2 a turn
    for t in turns:  # the weights that decided a turn are the ones its record names
        assert (t.policy_version, t.model) in {(version_a, "a"), (version_b, "b")}, t
    r0 = [t.policy_version for t in turns if t.request_id == "r0"]
    assert r0[0] == version_a and r0[-1] == version_b  # swapped within the request


def test_policies_are_built_once_per_name_and_parameters(tmp_path):
    cache = PolicyCache()
    weights = router_to("a", tmp_path / "router")
    first = cache("trained_router", {"weights": weights}, ("a", "b"))
    assert cache("trained_router", {"weights": weights}, ("a", "b")) is first
    assert cache("trained_router", {"weights": weights, "segment_len": 4}, ("a", "b")) is not first
    assert cache("round_robin", {}, ("a",)) is cache("round_robin", {}, ("a", "b"))
    with pytest.raises(Exception, match="not in the ensemble"):
        cache("fixed", {"model": "zz"}, ("a", "b"))
