"""Several choices for one OpenAI request (`n` samples of each prompt, a list of prompts): one
coordinator request per choice, run concurrently, and their streams merged as events arrive,
each tagged with its choice. Pure asyncio, no Ray: the ingress uses it over its backend.

    seeds = [choice_seed(body.seed, k) for k in range(len(prompts) * body.n)]
    results = await all_or_none([backend.generate(r) for r in requests])
    async for k, event in merged([backend.stream(r) for r in requests]):
        ...                                   # choice k's events, each choice's in order

Choice k of prompt j and sample i is k = j * n + i, as the OpenAI API numbers them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TypeVar

T = TypeVar("T")

_END = object()  # a stream's last item was queued


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: choice 0 keeps the request's (so n=1 answers as a plain
    request does), choice k > 0 one derived from (seed, k), the same on every rerun; no seed
    stays no seed (every choice samples on its own)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any log or engine takes it


def choice_request_id(request_id: str, index: int) -> str:
    """The id choice `index` is logged under (its feedback goes to it): the response's id for
    choice 0, `{id}-{k}` for choice k."""
    return request_id if index == 0 else f"{request_id}-{index}"


async def all_or_none(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Every call's result, in order; the first failure cancels the others and is raised as
    itself (not in an exception group, so it maps to its HTTP status as a lone one would)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) for every item of every stream as it arrives; each
    stream's items keep their order. The first failure ends the merge with that error;
    closing the merge (or its failure) closes every stream."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, _END))
        except Exception as e:  # handed to the reader, which raises it
            await queue.put((index, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if item is _END:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
