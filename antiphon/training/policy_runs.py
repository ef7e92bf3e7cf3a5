"""A policy over a task's items through a coordinator, keeping who wrote what: the harness
of the deferral experiment and of the gate's threshold search (which need the segments, not
only the text, to measure deferral rates and annotate answers).

    runs = await run_policy(coord, ("sft", "strong"), "defer", params, task, seed=0)
    score = task.score(task.items, texts(runs)); rate = token_share(runs, "strong")

Each generation's seed comes from (seed, task, item, sample) (`antiphon.zoo.evaluate.run_task`),
never from the order in which concurrent requests finish.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.messages import SamplingParams
from antiphon.sequence import Segment
from antiphon.zoo.evaluate import run_task
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
    """Every sample of every item of the task, per item in item order (the harness's
    `run_task`, keeping each generation's segments)."""

    async def generate(prompt: str, sampling: SamplingParams) -> Written:
        result = await coord.generate(
            GenerationRequest(
                prompt=prompt,
                models=models,
                policy=policy,
                policy_params=dict(params),
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                seed=sampling.seed,
            )  # fmt: skip
        )
        return Written(result.text, tuple(result.segments))

    return await run_task(generate, task, seed=seed, concurrency=concurrency)


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
