"""The rule policies and the registry, without models: decisions from hand-built views."""

from __future__ import annotations

import asyncio

import pytest

from antiphon.errors import InvalidRequest, NotFound
from antiphon.policies import (
    Finish,
    SearchStep,
    WriteSegment,
    WriteUntilDeferral,
    build_policy,
    policy_names,
    validate_policy_params,
)
from antiphon.sequence import SequenceView
from tests.factories import make_view

MODELS = ("base", "sft", "aligned")


def view(turn: int = 0, prompt: str = "What is 2+2?", seed: int | None = None) -> SequenceView:
    return make_view(models=MODELS, prompt=prompt, turn=turn, seed=seed)


def decide(policy, v: SequenceView):
    return asyncio.run(policy.decide(v))


def writers(policy, turns: int, **kw) -> list[str]:
    return [decide(policy, view(turn=t, **kw)).model for t in range(turns)]


def test_registry_lists_the_shipped_policies():
    assert set(policy_names()) >= {
        "fixed",
        "round_robin",
        "random_switch",
        "rule_router",
        "defer",
        "w2s_search",
    }


def test_fixed_always_the_same_model():
    p = build_policy("fixed", {"model": "sft", "segment_len": 7}, MODELS)
    assert {decide(p, view(turn=t)) for t in range(5)} == {WriteSegment("sft", 7)}
    assert (p.name, p.version) == ("fixed", "1")


def test_round_robin_cycles_in_order():
    p = build_policy("round_robin", {"segment_len": 4}, MODELS)
    assert writers(p, 6) == ["base", "sft", "aligned"] * 2
    p = build_policy("round_robin", {"order": ["aligned", "base"], "start": 1}, MODELS)
    assert writers(p, 4) == ["base", "aligned", "base", "aligned"]


def test_random_switch_repeats_with_its_seed_and_depends_on_it():
    a = writers(build_policy("random_switch", {"seed": 3}, MODELS), 40)
    again = writers(build_policy("random_switch", {"seed": 3}, MODELS), 40)
    other = writers(build_policy("random_switch", {"seed": 4}, MODELS), 40)
    assert a == again
    assert a != other
    assert set(a) == set(MODELS)  # uniform over the ensemble: all show up in 40 draws
    # Without its own seed it follows the request's.
    p = build_policy("random_switch", {}, MODELS)
    assert writers(p, 20, seed=9) == writers(p, 20, seed=9) != writers(p, 20, seed=10)
    only = build_policy("random_switch", {"candidates": ["sft", "aligned"]}, MODELS)
    assert set(writers(only, 30)) == {"sft", "aligned"}


def test_rule_router_picks_by_the_first_matching_rule():
    params = {
        "rules": [
            {"pattern": r"\d+\s*[-+*/]\s*\d+", "model": "base"},
            {"pattern": "capital of", "model": "sft"},
            {"pattern": "Story", "model": "aligned", "ignore_case": False},
        ],
        "default": "aligned",
        "segment_len": 16,
    }
    p = build_policy("rule_router", params, MODELS)
    assert decide(p, view(prompt="What is 12 + 30?")) == WriteSegment("base", 16)
    assert decide(p, view(prompt="The CAPITAL OF Velmora?")).model == "sft"
    assert decide(p, view(prompt="a story please")).model == "aligned"  # default: case matters
    assert decide(p, view(prompt="12+3, capital of X")).model == "base"  # first rule wins
    # One model for the whole response: the same choice on every turn.
    assert set(writers(p, 5, prompt="capital of Quelm")) == {"sft"}


def test_deferral_and_search_policies_make_their_decisions():
    d = build_policy("defer", {"base": "base", "assistant": "aligned", "eta": 0.3})
    assert decide(d, view()) == WriteUntilDeferral("base", "aligned", 0.3, 64, 1)
    roles = {"proposer": "base", "tuned": "sft", "untuned": "aligned"}
    step = decide(build_policy("w2s_search", roles), view())
    assert step == SearchStep("base", "sft", "aligned", 4, 4, 8, 1.0)
    assert step.models() == ("base", "sft", "aligned")
    # Best-of-N: one beam kept of N, one chunk the whole budget
    bon = build_policy("w2s_search", {**roles, "width": 1, "successors": 16, "chunk_len": None})
    assert decide(bon, view()) == SearchStep("base", "sft", "aligned", 1, 16, 100, 1.0)
    assert Finish().models() == ()


def test_registry_errors_name_the_problem():
    with pytest.raises(NotFound, match="unknown policy 'nope'"):
        build_policy("nope", {})
    with pytest.raises(InvalidRequest, match=r"policy_params\.segment_len"):
        build_policy("round_robin", {"segment_len": 0})
    with pytest.raises(InvalidRequest, match=r"policy_params\.bogus"):
        build_policy("round_robin", {"bogus": 1})
    with pytest.raises(InvalidRequest, match=r"policy_params\.model"):
        build_policy("fixed", {})
    with pytest.raises(InvalidRequest, match=r"policy_params\.rules\.0\.pattern.*regular"):
        build_policy("rule_router", {"default": "base", "rules": [{"pattern": "(", "model": "x"}]})
    with pytest.raises(InvalidRequest, match="'gpt'.*not in the ensemble"):
        validate_policy_params("rule_router", {"default": "gpt"}, MODELS)
    with pytest.raises(InvalidRequest, match=r"policy_params\.eta"):
        build_policy("defer", {"base": "a", "assistant": "b", "eta": 2})


def test_decisions_validate_their_fields():
    with pytest.raises(InvalidRequest, match="max_tokens"):
        WriteSegment("a", 0)
    with pytest.raises(InvalidRequest, match="gate_threshold"):
        WriteUntilDeferral("a", "b", 1.5, 8)
    with pytest.raises(InvalidRequest, match="width"):
        SearchStep("a", "b", "c", 0, 2, 4)
    with pytest.raises(InvalidRequest, match="temperature"):
        SearchStep("a", "b", "c", 2, 2, 4, temperature=0.0)
    with pytest.raises(InvalidRequest, match="three different models"):
        SearchStep("a", "b", "a", 2, 2, 4)
    with pytest.raises(InvalidRequest, match=r"policy_params.*three different models"):
        build_policy("w2s_search", {"proposer": "a", "tuned": "b", "untuned": "b"})
