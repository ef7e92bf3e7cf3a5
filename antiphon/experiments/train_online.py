"""`antiphon train online --config FILE`: the online switcher trainer over a turn log (see
`antiphon.training.online_trainer`), in this process or as a Ray job:

    antiphon train online --config online.yaml                # polls for ever
    antiphon train online --config online.yaml --until-idle   # stops once the log is read
    ray job submit --working-dir . -- antiphon train online --config online.yaml

The config (YAML, `OnlineTrainConfig`) names the turn log, the policy store, the trainer's
state directory, the switcher served first, and the dev slice that judges candidates:
`dev: {examples: DIR}` (a rollout store's labelled examples) or `dev: {app: NAME, ...}`
(zoo dev tasks asked through the running app's coordinator deployment, each candidate as
the switch policy's checkpoint). With `publish_to` (the hosted policy actor of an ensemble,
`antiphon-policy-<ensemble>`) each promotion is served at once; the trainer then runs on
the app's Ray cluster (`--address`, default: RAY_ADDRESS or the local one).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay out of `antiphon --help`
    from antiphon.training.online_trainer import DevSlice, Evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the trainer's YAML config")
    p.add_argument("--until-idle", action="store_true",
                   help="stop once a poll finds nothing new (default: poll for ever)")  # fmt: skip
    p.add_argument("--address", help="Ray cluster of the serving app (publish_to, dev.app)")


def serving_judge(dev: DevSlice, split: str = "dev") -> Evaluate:
    """Dev scores through the serving app: each item of the dev tasks asked of its
    coordinator deployment with the candidate as the switch policy's checkpoint (the other
    parameters are the hosted policy's), scored by the task's own metric (0-100). `split`
    only for a report's reference line: a trainer's judge never reads the test split."""
    from ray import serve

    from antiphon.coordinator.request import GenerationRequest
    from antiphon.zoo.evaluate import run_task, zoo_tasks
    from antiphon.zoo.tasks import TASK_NAMES

    tasks = [
        dataclasses.replace(t, items=t.items[: dev.limit])
        for t in zoo_tasks(split, dev.tasks or TASK_NAMES).values()
    ]

    async def scores(checkpoint: str) -> list[float]:
        coordinator = serve.get_deployment_handle("coordinator", app_name=dev.app)
        params = {**dev.policy_params, "switcher_path": checkpoint}

        async def ask(prompt, sampling) -> str:
            request = GenerationRequest(
                request_id=f"dev-{uuid.uuid4().hex}", prompt=prompt, models=tuple(dev.models),
                policy="switch", policy_params=params, max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                seed=sampling.seed, stop=tuple(sampling.stop_strings),
            )  # fmt: skip
            return (await coordinator.generate.remote(request)).text

        out = []
        for task in tasks:
            outputs = await run_task(ask, task, seed=dev.seed)
            out += [task.score([item], [o]) for item, o in zip(task.items, outputs, strict=True)]
        return out

    return lambda checkpoint: asyncio.run(scores(checkpoint))


def run(args: argparse.Namespace) -> int:
    import yaml

    from antiphon.training.online_trainer import (
        OnlineSwitcherTrainer,
        OnlineTrainConfig,
        actor_publisher,
        examples_judge,
        run_online,
    )

    config = OnlineTrainConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    if config.publish_to is not None or config.dev.app is not None:
        import ray

        ray.init(address=args.address, log_to_driver=False)
    dev = config.dev
    judge = examples_judge(dev.examples) if dev.examples else serving_judge(dev)
    publish = actor_publisher(config.publish_to) if config.publish_to else (lambda version: None)
    run_online(OnlineSwitcherTrainer(config, judge, publish), until_idle=args.until_idle)
    return 0
