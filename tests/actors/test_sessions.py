"""The session table on its own: bounds, eviction, why a session is gone, and prefix reuse
from live and closed sessions' caches (fake cache tensors, no model).

    pytest tests/actors/test_sessions.py -q
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from antiphon.actors.calls import Call, Generate
from antiphon.actors.sessions import REUSE_MIN_TOKENS, SessionTable
from antiphon.errors import Overloaded, SessionLost
from antiphon.messages import SamplingParams


def table(**kw) -> SessionTable:
    fields = dict(model_name="m", max_sessions=8, max_cached_tokens=1000, idle_timeout_s=60)
    fields.update(kw)
    return SessionTable(**fields)


def cache(tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A one-layer cache whose key at position t holds token t (so views can be checked)."""
    keys = torch.tensor(tokens, dtype=torch.float32).reshape(1, 1, -1, 1)
    return [(keys, keys.clone())]


def cached_session(t: SessionTable, tokens: list[int]):
    """A session whose cache covers all its tokens but the pending last one."""
    return t.new(list(tokens), cache(tokens[:-1]), len(tokens) - 1)


PREFIX = list(range(1, REUSE_MIN_TOKENS + 11))  # longer than the reuse minimum


def test_a_new_session_takes_the_longest_shared_prefix_of_a_live_one():
    t = table()
    donor = cached_session(t, PREFIX + [90, 91, 92])
    newcomer = t.new(PREFIX + [70, 71], [], 0)
    gained = t.reuse_prefix(newcomer)
    assert gained == len(PREFIX) == newcomer.n_cached
    assert newcomer.kv[0][0].flatten().tolist() == PREFIX  # the donor's positions, as views
    assert newcomer.kv[0][0].data_ptr() == donor.kv[0][0].data_ptr()
    assert t.reused_tokens == len(PREFIX)


def test_a_closed_sessions_cache_is_retained_for_the_next_one():
    t = table()
    t.close(cached_session(t, PREFIX + [5]))
    assert not t.live and t.retained_tokens == len(PREFIX)
    with pytest.raises(SessionLost, match="closed"):
        t.lookup(next(iter(t._gone)))
    again = t.new(PREFIX + [6], [], 0)
    assert t.reuse_prefix(again) == len(PREFIX)


def test_a_short_shared_prefix_is_not_worth_a_lookup():
    t = table()
    cached_session(t, PREFIX[: REUSE_MIN_TOKENS - 1] + [90] * 20)
    newcomer = t.new(PREFIX[: REUSE_MIN_TOKENS - 1] + [70] * 20, [], 0)
    assert t.reuse_prefix(newcomer) == 0 and newcomer.n_cached == 0


def test_a_session_in_the_decode_batch_is_no_donor():
    t = table()
    busy = cached_session(t, PREFIX + [1])
    busy.kv = []  # the decode batch holds its cache
    assert t.reuse_prefix(t.new(PREFIX + [2], [], 0)) == 0


def test_room_is_made_from_retained_caches_first_then_the_least_recently_used():
    t = table(max_sessions=3, max_cached_tokens=2 * (len(PREFIX) + 1) + len(PREFIX))
    t.close(cached_session(t, PREFIX + [1]))  # retained
    old, recent = cached_session(t, PREFIX + [2]), cached_session(t, PREFIX + [3])
    t.touch(recent)
    t.make_room(new_tokens=len(PREFIX), new_sessions=1)
    assert t.retained_tokens == 0 and set(t.live) == {old.session_id, recent.session_id}
    t.make_room(new_tokens=len(PREFIX) + 5, new_sessions=1)
    assert set(t.live) == {recent.session_id}
    with pytest.raises(SessionLost, match="evicted"):
        t.lookup(old.session_id)


def test_busy_sessions_are_never_evicted():
    t = table(max_sessions=1)
    busy = t.new([1, 2, 3], [], 0)
    loop = asyncio.new_event_loop()
    try:
        busy.calls.append(
            Call(Generate(busy.session_id, SamplingParams()), loop, loop.create_future())
        )
        with pytest.raises(Overloaded, match="full"):
            t.make_room(new_tokens=1, new_sessions=1)
    finally:
        loop.close()


def test_forgetting_a_session_fails_its_waiting_calls_with_the_reason():
    t = table()
    session = t.new([1, 2, 3], [], 0)
    loop = asyncio.new_event_loop()
    try:
        future = loop.create_future()
        session.calls.append(Call(Generate(session.session_id, SamplingParams()), loop, future))
        t.forget(session, "expired after 1s idle")
        loop.run_until_complete(asyncio.sleep(0))
        with pytest.raises(SessionLost, match="expired after 1s idle"):
            future.result()
    finally:
        loop.close()
    assert t.tokens_held == 0


def test_fork_and_truncate_share_and_cut_the_cache():
    t = table()
    parent = cached_session(t, PREFIX + [7, 8])
    (child,) = t.fork(parent, 1, length=10)
    assert child.token_ids == parent.token_ids[:10] and child.n_cached == 9
    assert child.kv[0][0].flatten().tolist() == parent.token_ids[:9]
    t.truncate(parent, 4)
    assert parent.token_ids == PREFIX[:4] and parent.n_cached == 3
    assert t.tokens_held == len(child.token_ids) + 4


def test_of_several_caches_the_one_sharing_the_longest_prefix_is_taken():
    t = table()
    target = list(range(1, 61))
    for shared in (20, 45, 30):  # the longest is neither first nor last
        cached_session(t, target[:shared] + [900 + shared] * 10)
    newcomer = t.new(list(target), [], 0)
    assert t.reuse_prefix(newcomer) == 45
    assert newcomer.kv[0][0].flatten().tolist() == target[:45]
