"""The `defer` and `random_defer` policies and the eta warm-up, without models."""

from __future__ import annotations

import asyncio

import pytest

from antiphon.errors import InvalidRequest
from antiphon.policies import WriteSegment, WriteUntilDeferral, build_policy
from antiphon.policies.defer import warmup_threshold, warmup_thresholds
from antiphon.sequence import Segment
from tests.factories import make_view

MODELS = ("sft", "strong")


def decide(policy, view):
    return asyncio.run(policy.decide(view))


def test_defer_decides_with_its_strategy_and_warm_up():
    p = build_policy("defer", {"base": "sft", "assistant": "strong", "eta": 0.4,
                               "strategy": "compose", "warmup_schedule": "cosine",
                               "warmup_steps": 5, "warmup_start": 0.9}, MODELS)  # fmt: skip
    d = decide(p, make_view(models=MODELS))
    assert d == WriteUntilDeferral("sft", "strong", 0.4, 64, 1, "compose", "cosine", 5, 0.9)
    assert d.models() == ("sft", "strong")


@pytest.mark.parametrize(
    "params, field",
    [({"eta": 1.5}, "eta"), ({"strategy": "vote"}, "strategy"),
     ({"warmup_schedule": "steep"}, "warmup_schedule"), ({"warmup_steps": -1}, "warmup_steps"),
     ({"assistant": "gpt"}, "not in the ensemble")],
)  # fmt: skip
def test_defer_refuses_bad_parameters_by_name(params, field):
    with pytest.raises(InvalidRequest, match=field):
        build_policy("defer", {"base": "sft", "assistant": "strong", **params}, MODELS)


def test_decisions_refuse_what_the_executor_cannot_run():
    with pytest.raises(InvalidRequest, match="strategy"):
        WriteUntilDeferral("a", "b", 0.5, 8, strategy="vote")
    with pytest.raises(InvalidRequest, match="warmup_start"):
        WriteUntilDeferral("a", "b", 0.5, 8, warmup_start=2.0)
    with pytest.raises(InvalidRequest, match="warmup_steps"):
        WriteUntilDeferral("a", "b", 0.5, 8, warmup_steps=-2)


@pytest.mark.parametrize("schedule", ["linear", "exponential", "cosine"])
def test_warm_up_goes_from_its_start_to_eta(schedule):
    ts = [warmup_threshold(i, schedule, 10, 0.9, 0.3) for i in range(12)]
    assert ts[0] == pytest.approx(0.9)
    assert ts[10] == ts[11] == 0.3
    assert all(a >= b for a, b in zip(ts, ts[1:], strict=False))  # comes down monotonically
    assert 0.3 < ts[5] < 0.9


def test_warm_up_thresholds_of_a_call_start_where_the_response_is():
    # 3 tokens written: the call's first token is response token 3
    assert warmup_thresholds(3, 4, "linear", 5, 1.0, 0.5) == pytest.approx((0.7, 0.6))
    assert warmup_thresholds(6, 4, "linear", 5, 1.0, 0.5) == ()  # past the warm-up: eta
    assert warmup_thresholds(0, 4, "constant", 5, 1.0, 0.5) == ()


def seg(model: str) -> Segment:
    return Segment(model, (5,), "x", (-1.0,), 0)


def test_random_defer_alternates_and_matches_its_rate():
    p = build_policy("random_defer", {"base": "sft", "assistant": "strong", "rate": 0.25}, MODELS)
    after_base = decide(p, make_view(models=MODELS, segments=(seg("sft"),)))
    assert after_base == WriteSegment("strong", 1)  # a base run ends in one deferred token
    runs = [decide(p, make_view(models=MODELS, seed=s, max_tokens=10_000)).max_tokens
            for s in range(2000)]  # fmt: skip
    # tokens before a deferral are geometric: mean (1 - rate) / rate = 3 (runs of 0 are
    # written as the assistant's turn, counted as 0 here)
    decisions = [decide(p, make_view(models=MODELS, seed=s, max_tokens=10_000))
                 for s in range(2000)]  # fmt: skip
    lengths = [d.max_tokens if d.model == "sft" else 0 for d in decisions]
    assert sum(lengths) / len(lengths) == pytest.approx(3.0, rel=0.1)
    assert runs == [d.max_tokens for d in decisions]  # same seed, same decision


def test_random_defer_at_the_extremes():
    never = build_policy("random_defer", {"base": "sft", "assistant": "strong", "rate": 0.0})
    always = build_policy("random_defer", {"base": "sft", "assistant": "strong", "rate": 1.0})
    v = make_view(models=MODELS, max_tokens=40)
    assert decide(never, v) == WriteSegment("sft", 40)
    assert decide(always, v) == WriteSegment("strong", 1)
