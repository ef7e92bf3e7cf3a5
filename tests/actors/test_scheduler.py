"""The engine's scheduler on made-up candidates: no model, no sessions, no threads.

pytest tests/actors/test_scheduler.py -q
"""

from __future__ import annotations

from antiphon.actors.scheduler import Candidate, Plan, schedule


def decode(key, seq, slot=None) -> Candidate:
    return Candidate(key, decode=True, tokens=1, seq=seq, batch_slot=slot)


def prefill(key, tokens) -> Candidate:
    return Candidate(key, decode=False, tokens=tokens, seq=0)


def test_nothing_ready_plans_nothing():
    assert schedule([], last_step_decoded=False, max_batch=8) is None


def test_decode_rows_keep_their_batch_slots_and_newcomers_follow_oldest_first():
    rows = [decode("new-late", 9), decode("member-1", 5, slot=1), decode("new-early", 2),
            decode("member-0", 7, slot=0)]  # fmt: skip
    plan = schedule(rows, last_step_decoded=False, max_batch=8)
    assert plan == Plan(True, ("member-0", "member-1", "new-early", "new-late"))


def test_decode_batch_is_capped_at_max_batch_keeping_the_oldest():
    rows = [decode(f"s{i}", seq=10 - i) for i in range(5)]
    assert schedule(rows, last_step_decoded=False, max_batch=2).keys == ("s4", "s3")


def test_decode_and_prefill_alternate_when_both_wait():
    rows = [decode("d", 1), prefill("p", 30)]
    assert schedule(rows, last_step_decoded=False, max_batch=8) == Plan(True, ("d",))
    assert schedule(rows, last_step_decoded=True, max_batch=8) == Plan(False, ("p",))
    only_decode = [decode("d", 1)]
    assert schedule(only_decode, last_step_decoded=True, max_batch=8) == Plan(True, ("d",))


def test_prefill_rows_fill_the_token_budget_in_table_order_and_at_least_one_runs():
    rows = [prefill("a", 40), prefill("b", 10), prefill("c", 60), prefill("d", 5)]
    # padded size is rows x longest: a+b = 2 x 40, a+b+c = 3 x 60 > 150
    plan = schedule(rows, last_step_decoded=False, max_batch=8, prefill_budget=150)
    assert plan == Plan(False, ("a", "b"))
    huge = [prefill("big", 10_000), prefill("small", 1)]
    assert schedule(huge, last_step_decoded=False, max_batch=8, prefill_budget=150).keys == ("big",)


def test_prefill_is_capped_at_max_batch():
    rows = [prefill(f"p{i}", 2) for i in range(5)]
    assert schedule(rows, last_step_decoded=False, max_batch=3).keys == ("p0", "p1", "p2")
