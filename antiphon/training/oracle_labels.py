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
4. every distinct answer a right candidate reached is expanded in turn (each text once), so
   the examples are the states a switcher that decides right passes through, and each of
   their labels is exact, not a sampled estimate;
5. each segment of a state's trace is tagged, among the writers that wrote that text, with
   the one right most often over all the labelled states (`tag_order`): the writer a trained
   switcher picks wherever it is right. Tagging the first right writer in ensemble order
   wrote traces a switcher never writes (base, first, on most segments, where the trained
   switcher picks a tuned model), so at test it read traces unlike any it was trained on,
   and on the training states themselves it fitted only half of the states where the tuned
   models are wrong.

This is imitation of a search teacher (learning to search, as DAgger does with an expert),
not the paper's rollouts; it needs the reference, so it labels the training split only.
DAgger's second half is `label_switcher_paths`: the states a trained switcher passes on its
own answers, labelled the same way, so the next switcher is trained where the last one went.
The examples are `RolloutExample`s: the switcher trainer reads them unchanged.

    examples = await label_by_oracle(queries, {"base": gen.segment, ...}, segment_len=4)
    examples += await label_switcher_paths(queries, writers, paths, segment_len=4)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from antiphon.training.rollouts import RolloutExample, example_key, label_from_utilities

Segment = Callable[[str, int], Awaitable[tuple[str, bool]]]  # (prompt, n) -> (text, eos)
Trace = tuple[tuple[tuple[int, ...], str], ...]  # per segment: (every writer of it, text)


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


@dataclass(frozen=True)
class OracleState:
    """One state the oracle passed: its trace, each segment with every writer that wrote that
    text there (ensemble indices), and per candidate whether its next segment is right."""

    segments: Trace
    right: tuple[bool, ...]


def judge(
    query: OracleQuery, depth: int, answer: str, outs: Sequence[tuple[str, bool]], segment_len: int
) -> list[tuple[str, bool, bool]]:
    """Each candidate's segment `outs[i]` (text, eos), written at the state `answer` after
    `depth` segments: (the answer it makes, whether that ends it, whether it is right)."""
    last = (depth + 1) * segment_len >= query.max_tokens  # the budget ends it after this one
    judged = []
    for text, ended in outs:
        new, final = answer + text, ended or last or not text
        judged.append((new, final, query.solved(new) if final else query.on_path(new)))
    return judged


async def oracle_states(
    query: OracleQuery, writers: Mapping[str, Segment], *, segment_len: int, max_states: int = 256
) -> list[OracleState]:
    """The states on the oracle's path (at most `max_states`), breadth first."""
    models = list(writers)
    out: list[OracleState] = []
    level: list[tuple[Trace, str]] = [((), "")]  # (segments, answer)
    seen = {""}
    while level and len(out) < max_states:
        written = await asyncio.gather(
            *(asyncio.gather(*(writers[m](query.prompt + answer, segment_len) for m in models))
              for _, answer in level)
        )  # fmt: skip
        next_level = []
        for (segments, answer), outs in zip(level, written, strict=True):
            judged = judge(query, len(segments), answer, outs, segment_len)
            right = [r for _, _, r in judged]
            for i, ((text, _), (new, final, _)) in enumerate(zip(outs, judged, strict=True)):
                if right[i] and not final and new not in seen:
                    seen.add(new)
                    wrote = tuple(j for j, (t, _) in enumerate(outs) if t == text and right[j])
                    next_level.append(((*segments, (wrote, text)), new))
            out.append(OracleState(segments, tuple(right)))
            if len(out) >= max_states:
                break
        level = next_level
    return out


def tag_order(states: Sequence[OracleState], n: int) -> list[int]:
    """The ensemble's indices, the most often right first (ties: lower index first)."""
    counts = [sum(s.right[i] for s in states) for i in range(n)]
    return sorted(range(n), key=lambda i: (-counts[i], i))


def state_example(
    query: OracleQuery,
    models: Sequence[str],
    state: OracleState,
    order: Sequence[int],
    segment_len: int,
    source: str = "oracle",
) -> RolloutExample:
    """The state as a labelled example, each segment tagged with its first writer in `order`
    (`source` names whose path the state is on, in the example's key)."""
    rank = {m: r for r, m in enumerate(order)}
    prefix = [(min(wrote, key=rank.__getitem__), text) for wrote, text in state.segments]
    utilities = [float(r) for r in state.right]
    best, label = label_from_utilities(utilities)
    prefix_tokens = len(prefix) * segment_len  # every segment before the last is full
    chars = len("".join(t for _, t in prefix))
    return RolloutExample(
        key=example_key(query.key, f"{source}-{len(prefix)}-{chars}"),
        task=query.task,
        query=query.prompt,
        models=list(models),
        prefix=prefix,
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
    their sessions), in the order of `queries`, tagged by the `tag_order` of all their states."""
    limit = asyncio.Semaphore(concurrency)

    async def one(q: OracleQuery) -> list[OracleState]:
        async with limit:
            return await oracle_states(q, writers, segment_len=segment_len)

    found = await asyncio.gather(*(one(q) for q in queries))
    models = list(writers)
    order = tag_order([s for states in found for s in states], len(models))
    return [
        state_example(q, models, s, order, segment_len)
        for q, states in zip(queries, found, strict=True)
        for s in states
    ]


async def path_states(
    query: OracleQuery,
    writers: Mapping[str, Segment],
    path: Sequence[tuple[int, str]],
    *,
    segment_len: int,
) -> list[OracleState]:
    """The states a switcher passed on its own answer to `query` (`path`: its segments, each
    (writer's index, text)), up to and including the first where its segment went wrong, each
    labelled as the oracle labels its states, its trace tagged with the switcher's own writers.
    These are the learner's states that DAgger adds to the teacher's: the oracle's path tags
    each segment with one writer, the switcher's own answers may name another, and the state
    where it first goes wrong is, by construction, one it has not learnt."""
    if not path:
        return []
    models = list(writers)
    answers = ["".join(t for _, t in path[: k + 1]) for k in range(len(path))]  # after segment k
    # the answer's own text says where it left the reference (its last segment ended it), so
    # only the states up to there are written out, not every state of a long wrong answer
    went_wrong = [not query.on_path(a) for a in answers[:-1]] + [not query.solved(answers[-1])]
    stop = went_wrong.index(True) if any(went_wrong) else len(path) - 1
    before = ["", *answers[:stop]]  # the answer at each state, up to the one it erred in
    written = await asyncio.gather(
        *(asyncio.gather(*(writers[m](query.prompt + a, segment_len) for m in models))
          for a in before)
    )  # fmt: skip
    return [
        OracleState(tuple(((i,), text) for i, text in path[:k]),
                    tuple(r for _, _, r in judge(query, k, answer, outs, segment_len)))
        for k, (answer, outs) in enumerate(zip(before, written, strict=True))
    ]  # fmt: skip


async def label_switcher_paths(
    queries: Sequence[OracleQuery],
    writers: Mapping[str, Segment],
    paths: Sequence[Sequence[tuple[int, str]]],
    *,
    segment_len: int,
    concurrency: int = 16,
) -> list[RolloutExample]:
    """Every query's `path_states` along the switcher's own answer `paths[i]`, as examples
    (DAgger's aggregation step: the trainer reads them beside the oracle's), in the order of
    `queries`."""
    limit = asyncio.Semaphore(concurrency)

    async def one(q: OracleQuery, path) -> list[OracleState]:
        async with limit:
            return await path_states(q, writers, path, segment_len=segment_len)

    found = await asyncio.gather(*(one(q, p) for q, p in zip(queries, paths, strict=True)))
    models, order = list(writers), range(len(writers))  # each segment has its one writer
    return [
        state_example(q, models, s, order, segment_len, source="switch")
        for q, states in zip(queries, found, strict=True)
        for s in states
    ]
