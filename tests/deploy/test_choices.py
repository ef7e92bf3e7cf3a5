"""The choices of one OpenAI request, without Ray: seeds, merged streams, all or none."""

from __future__ import annotations

import asyncio

import pytest

from antiphon.deploy.choices import all_or_none, choice_request_id, choice_seed, merged
from antiphon.errors import InvalidRequest


def test_choice_seeds_keep_the_first_derive_the_rest_and_leave_none_alone():
    seeds = [choice_seed(7, k) for k in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [choice_seed(7, k) for k in range(4)]  # the same on every rerun
    assert all(0 <= s < 2**63 for s in seeds)
    assert choice_seed(None, 3) is None
    assert [choice_request_id("r", k) for k in range(3)] == ["r", "r-1", "r-2"]


async def counting(name: str, n: int, pause_s: float, fail_at: int | None = None):
    for i in range(n):
        await asyncio.sleep(pause_s)
        if i == fail_at:
            raise InvalidRequest(f"{name} failed at {i}")
        yield f"{name}{i}"


def test_merged_streams_keep_each_order_and_interleave_as_items_arrive():
    async def main():
        slow, fast = counting("s", 3, 0.03), counting("f", 3, 0.01)
        return [x async for x in merged([slow, fast])]

    got = asyncio.run(main())
    assert [item for i, item in got if i == 0] == ["s0", "s1", "s2"]
    assert [item for i, item in got if i == 1] == ["f0", "f1", "f2"]
    assert got[0] == (1, "f0")  # the fast one's first item did not wait for the slow one


def test_one_failing_stream_ends_the_merge_with_its_error_and_closes_the_others():
    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield "x"
        finally:
            closed.append("endless")

    async def main():
        async for _ in merged([endless(), counting("f", 5, 0.02, fail_at=2)]):
            pass

    with pytest.raises(InvalidRequest, match="f failed at 2"):
        asyncio.run(main())
    assert closed == ["endless"]


def test_all_or_none_cancels_the_rest_on_the_first_failure_and_raises_it_alone():
    cancelled = []

    async def slow():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise

    async def failing():
        await asyncio.sleep(0.01)
        raise InvalidRequest("bad choice")

    async def fine():
        return 1

    with pytest.raises(InvalidRequest, match="bad choice"):
        asyncio.run(all_or_none([slow(), failing()]))
    assert cancelled == ["slow"]
    assert asyncio.run(all_or_none([fine(), fine()])) == [1, 1]
