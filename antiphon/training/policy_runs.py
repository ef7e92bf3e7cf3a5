"""A policy over a task's items through a coordinator, keeping who wrote what: the harness
of the deferral experiment and of the gate's threshold search (which need the segments, not
only the text, to measure deferral rates and annotate answers).

    runs = await run_policy(coord, ("sft", "strong"), "defer", params, task, seed=0)
    score = task.score(task.items, texts(runs)); rate = token_share(runs, "strong")

Each generation's seed comes from (seed, task, item, sample) (`antiphon.zoo.evaluate`), never
from the order in which concurrent requests finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.sequence import Segment
from antiphon.zoo.evaluate import sample_seed
from antiphon.zoo.tasks import Task


@dataclass(frozen=True)
class Written:
    """One generation: its text and its segments."""

    text: str
    segments: tuple[Segment, ...]


async def run_policy(
    coord: Coordinator,
    models: tuple[str, ...],
    policy: str,
    params: Mapping[str, object],
    task: Task,
    *,
    seed: int = 0,
    concurrency: int = 32,
) -> list[list[Written]]:
    """Every sample of every item of the task, per item in item order."""
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, j: int) -> Written:
        sampling = task.sampling(sample_seed(seed, task.name, i, j))
        async with limit:
            result = await coord.generate(
                GenerationRequest(
                    prompt=task.items[i].prompt,
                    models=models,
                    policy=policy,
                    policy_params=dict(params),
                    max_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature,
                    seed=sampling.seed,
                )  # fmt: skip
            )
        return Written(result.text, tuple(result.segments))

    flat = await asyncio.gather(
        *(one(i, j) for i in range(len(task.items)) for j in range(task.samples))
    )
    n = task.samples
    return [list(flat[i * n : (i + 1) * n]) for i in range(len(task.items))]


def texts(runs: Sequence[Sequence[Written]]) -> list[list[str]]:
    return [[w.text for w in item] for item in runs]


def token_share(runs: Sequence[Sequence[Written]], model: str) -> float:
    """The fraction of all response tokens that `model` wrote (its deferral rate, for an
    assistant), each token counted in its writer's tokenizer."""
    mine = total = 0
    for item in runs:
        for w in item:
            for s in w.segments:
                total += len(s.token_ids)
                mine += len(s.token_ids) * (s.model == model)
    return mine / total if total else 0.0


def annotate(written: Written, model: str, mark: tuple[str, str] = ("[[", "]]")) -> str:
    """The text with `model`'s segments between the marks."""
    return "".join(
        f"{mark[0]}{s.text}{mark[1]}" if s.model == model else s.text for s in written.segments
    )
