"""Switcher labels from the oracle's path, for tasks whose reference is the one right answer.

Random-switch rollouts label an exact-answer query badly: a random completion almost never
writes the whole sentence, so every candidate's utility ties at 0 (or differs by the luck of
the completion), and the labelled prefixes are states the switcher never reaches. Here the
teacher is the oracle switch itself (`antiphon.zoo.evaluate.oracle_switch`, the search the
zoo's headroom is measured with), on dev items only:

1. from the empty answer, every candidate writes its greedy segment;
2. a candidate is right when its segment keeps the answer on the reference (a prefix of it,
   or, where the segment ends the answer, the whole of it verified);
3. the state is one labelled example (utility 1 for a right candidate, 0 for a wrong one);
4. every distinct answer a right candidate reached is expanded in turn (each text once,
   tagged with the first right writer), so the examples are the states a switcher that
   decides right passes through, and each of their labels is exact, not a sampled estimate.

This is imitation of a search teacher (learning to search, as DAgger does with an expert),
not the paper's rollouts; it needs the reference, so it labels the training split only.
The examples are `RolloutExample`s: the switcher trainer reads them unchanged.

    examples = await oracle_path_examples(query, {"base": gen.segment, ...}, segment_len=4)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from antiphon.training.rollouts import RolloutExample, example_key, label_from_utilities

Segment = Callable[[str, int], Awaitable[tuple[str, bool]]]  # (prompt, n) -> (text, eos)


@dataclass(frozen=True)
class OracleQuery:
    """One training question with its one right answer."""

    key: str  # unique id, e.g. "qa-knowledge:17"
    task: str
    prompt: str
    on_path: Callable[[str], bool]  # is this unfinished answer still a prefix of a right one?
    solved: Callable[[str], bool]  # is this finished answer right?
    max_tokens: int


def reference_query(key: str, task: str, prompt: str, reference: str, verify, max_tokens: int):
    """An `OracleQuery` for an answer written after the prompt as " " + reference (the zoo's
    Q/A format), finished answers checked by `verify(text) -> score` (1.0: right)."""
    target = " " + reference
    return OracleQuery(
        key=key,
        task=task,
        prompt=prompt,
        on_path=target.startswith,
        solved=lambda text: verify(text) >= 1.0,
        max_tokens=max_tokens,
    )


async def oracle_path_examples(
    query: OracleQuery,
    writers: Mapping[str, Segment],
    *,
    segment_len: int,
    max_states: int = 256,
) -> list[RolloutExample]:
    """One example per state on the oracle's path (at most `max_states`), breadth first."""
    models = list(writers)
    out: list[RolloutExample] = []
    seen = {""}
    level: list[tuple[tuple[tuple[int, str], ...], str]] = [((), "")]  # (segments, answer)
    while level and len(out) < max_states:
        written = await asyncio.gather(
            *(asyncio.gather(*(writers[m](query.prompt + answer, segment_len) for m in models))
              for _, answer in level)
        )  # fmt: skip
        next_level = []
        for (segments, answer), outs in zip(level, written, strict=True):
            # the budget ends the answer after this segment
            last = (len(segments) + 1) * segment_len >= query.max_tokens
            right = []
            for i, (text, ended) in enumerate(outs):
                new = answer + text
                final = ended or last or not text
                ok = query.solved(new) if final else query.on_path(new)
                right.append(ok)
                if ok and not final and new not in seen:
                    seen.add(new)
                    next_level.append(((*segments, (i, text)), new))
            out.append(_example(query, models, segments, right, segment_len))
            if len(out) >= max_states:
                break
        level = next_level
    return out


def _example(
    query: OracleQuery,
    models: Sequence[str],
    segments: Sequence[tuple[int, str]],
    right: Sequence[bool],
    segment_len: int,
) -> RolloutExample:
    utilities = [float(r) for r in right]
    best, label = label_from_utilities(utilities)
    prefix_tokens = len(segments) * segment_len  # every segment before the last is full
    chars = len("".join(t for _, t in segments))
    return RolloutExample(
        key=example_key(query.key, f"oracle-{len(segments)}-{chars}"),
        task=query.task,
        query=query.prompt,
        models=list(models),
        prefix=list(segments),
        utilities=utilities,
        scores=[[u] for u in utilities],
        best=best,
        label=label,
        prefix_tokens=prefix_tokens,
        total_tokens=prefix_tokens + segment_len,
    )


async def label_by_oracle(
    queries: Sequence[OracleQuery],
    writers: Mapping[str, Segment],
    *,
    segment_len: int,
    concurrency: int = 16,
) -> list[RolloutExample]:
    """Every query's oracle-path examples, `concurrency` queries at a time (the engines batch
    their sessions), in the order of `queries`."""
    limit = asyncio.Semaphore(concurrency)

    async def one(q: OracleQuery) -> list[RolloutExample]:
        async with limit:
            return await oracle_path_examples(q, writers, segment_len=segment_len)

    found = await asyncio.gather(*(one(q) for q in queries))
    return [ex for exs in found for ex in exs]
