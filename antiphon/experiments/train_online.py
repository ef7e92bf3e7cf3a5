"""`antiphon train online --config FILE`: the online trainer of the switcher or of a deferral
gate over a turn log (see `antiphon.training.online_trainer`), in this process or as a Ray
job:

    antiphon train online --config online.yaml                # polls for ever
    antiphon train online --config online.yaml --until-idle   # stops once the log is read
    ray job submit --working-dir . -- antiphon train online --config online.yaml
    antiphon train online --config online.yaml --actor      # a detached trainer actor

The config (YAML, `OnlineTrainConfig`) names the turn log, the policy store, the trainer's
state directory, the switcher served first, and the dev slice that judges candidates:
`dev: {examples: DIR}` (a rollout store's labelled examples) or `dev: {app: NAME, ...}`
(zoo dev tasks asked through the running app's coordinator deployment, each candidate as
the switch policy's checkpoint). With `publish_to` (the hosted policy actor of an ensemble,
`antiphon-policy-<ensemble>`) each promotion is served at once; the trainer then runs on
the app's Ray cluster (`--address`, default: RAY_ADDRESS or the local one).

`learner: gate` learns the gate of `base_checkpoint` from the `defer` requests: the
assistant's log-probs come from the app's deployment of the assistant (`dev.policy_params`
names both models), candidates are judged by a coordinator in this process over the app's
assistant and an engine of the base carrying the candidate, and a promotion is served by
the store's link alone (serve the base with `gate_path: <store>/served/gate.safetensors`).

With `rollouts:` the switcher also learns from fresh rollouts from each rewarded request's
logged prefixes, run through the app's coordinator and scored by the zoo's verifier of its
prompt (`antiphon.training.online_rollouts`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay out of `antiphon --help`
    from antiphon.coordinator.request import GenerationRequest
    from antiphon.training.online_trainer import DevSlice, Evaluate, OnlineTrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the trainer's YAML config")
    p.add_argument("--until-idle", action="store_true",
                   help="stop once a poll finds nothing new (default: poll for ever)")  # fmt: skip
    p.add_argument("--address", help="Ray cluster of the serving app (publish_to, dev.app)")
    p.add_argument("--actor", action="store_true",
                   help="start it as a detached Ray actor on the cluster "
                   "(antiphon-trainer-<consumer>) and return")  # fmt: skip


def dev_item_scores(
    generate: Callable[[GenerationRequest], Awaitable[object]], dev: DevSlice, policy: str,
    params: dict, split: str = "dev",
) -> Callable[[], Awaitable[list[float]]]:  # fmt: skip
    """Each item of the dev tasks asked through `generate` (a coordinator's, or its
    deployment's) with `policy` and `params`, scored by the task's own metric (0-100).
    `split` only for a report's reference line: a trainer's judge never reads the test
    split."""
    from antiphon.coordinator.request import GenerationRequest
    from antiphon.zoo.evaluate import run_task, zoo_tasks
    from antiphon.zoo.tasks import TASK_NAMES

    tasks = [
        dataclasses.replace(t, items=t.items[: dev.limit])
        for t in zoo_tasks(split, dev.tasks or TASK_NAMES).values()
    ]

    async def ask(prompt, sampling) -> str:
        request = GenerationRequest(
            request_id=f"dev-{uuid.uuid4().hex}", prompt=prompt, models=tuple(dev.models),
            policy=policy, policy_params=params, max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            seed=sampling.seed, stop=tuple(sampling.stop_strings),
        )  # fmt: skip
        return (await generate(request)).text

    async def scores() -> list[float]:
        out = []
        for task in tasks:
            outputs = await run_task(ask, task, seed=dev.seed)
            out += [task.score([item], [o]) for item, o in zip(task.items, outputs, strict=True)]
        return out

    return scores


def serving_judge(dev: DevSlice, split: str = "dev") -> Evaluate:
    """Dev scores through the serving app: each dev item asked of its coordinator deployment
    with the candidate as the switch policy's checkpoint (the other parameters are the
    hosted policy's)."""
    from ray import serve

    def evaluate(checkpoint: str) -> list[float]:
        coordinator = serve.get_deployment_handle("coordinator", app_name=dev.app)
        params = {**dev.policy_params, "switcher_path": checkpoint}
        return asyncio.run(
            dev_item_scores(coordinator.generate.remote, dev, "switch", params, split)()
        )

    return evaluate


def gate_serving_judge(config: OnlineTrainConfig, assistant: Any, tokenizer: Any) -> Evaluate:
    """Dev scores of a gate: the dev items asked of a coordinator in this process, over an
    engine of the base whose gate is the candidate (a link moved to each version judged, as
    serving moves its own) and the app's assistant deployment, with the policy `defer` and
    the ensemble's parameters."""
    from antiphon.actors.engine import ModelEngine
    from antiphon.config import ModelSpec
    from antiphon.coordinator.loop import Coordinator
    from antiphon.training.durable import replace_link

    dev = config.dev
    base_name, assistant_name = dev.policy_params["base"], dev.policy_params["assistant"]
    link = Path(config.state_dir) / "judged"
    engine: list[ModelEngine] = []  # started at the first judgement, when the link exists

    def evaluate(version: str) -> list[float]:
        replace_link(link, Path(version).resolve(), durable=False)  # judged again after a crash
        if not engine:
            engine.append(ModelEngine(ModelSpec(
                name=base_name, path=config.base_checkpoint,
                gate_path=str(link / "gate.safetensors"),
            )))  # fmt: skip

        async def scores() -> list[float]:
            coord = Coordinator({base_name: engine[0], assistant_name: assistant},
                                {base_name: tokenizer, assistant_name: tokenizer})  # fmt: skip
            return await dev_item_scores(coord.generate, dev, "defer", dict(dev.policy_params))()

        return asyncio.run(scores())

    return evaluate


def run(args: argparse.Namespace) -> int:
    import yaml

    from antiphon.training.online_trainer import OnlineTrainConfig, run_online

    config = OnlineTrainConfig.model_validate(yaml.safe_load(Path(args.config).read_text()))
    if args.actor or config.publish_to is not None or config.dev.app is not None:
        import ray

        # a detached actor must outlive this driver: on a running cluster, not a private one
        ray.init(address=args.address or ("auto" if args.actor else None), log_to_driver=False)
    if args.actor:
        actor = start_trainer_actor(config)
        print(f"trainer actor {trainer_actor_name(config)}: {ray.get(actor.status.remote())}")
        return 0
    run_online(build_trainer(config), until_idle=args.until_idle)
    return 0


def build_trainer(config: OnlineTrainConfig):
    """The trainer a config describes: its learner, judge, publisher and rollouts."""
    from antiphon.training.online_learners import SwitchLearner
    from antiphon.training.online_trainer import OnlineTrainer, actor_publisher, examples_judge

    dev = config.dev
    if config.learner == "gate":
        learner, judge = gate_learner_and_judge(config)
    else:
        learner = SwitchLearner(config.train)
        judge = examples_judge(dev.examples) if dev.examples else serving_judge(dev)
    publish = actor_publisher(config.publish_to) if config.publish_to else (lambda version: None)
    rollouts = logged_prefix_rollouts(config) if config.rollouts is not None else None
    return OnlineTrainer(config, learner, judge, publish, rollouts)


class TrainerActor:
    """One online trainer as a Ray actor (`start_trainer_actor`): it polls the log every
    poll_s in a thread of its own, so `status()` answers while it trains. Restarted after a
    crash, it goes on from its saved state (exactly once, as the trainer is)."""

    def __init__(self, config: dict) -> None:
        import threading

        from antiphon.training.online_trainer import OnlineTrainConfig

        self.trainer = build_trainer(OnlineTrainConfig.model_validate(config))
        self.stopping = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="online-trainer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from antiphon.logging import get_logger

        try:
            while not self.stopping.is_set():
                self.trainer.poll()
                self.stopping.wait(self.trainer.config.poll_s)
        except Exception as e:  # kept for status(): the actor stays up to say why
            self.error = f"{type(e).__name__}: {e}"
            get_logger(__name__).error("trainer stopped", error=self.error)

    def status(self) -> dict:
        """Where the trainer is: its log offset, candidates made, the served version, the
        examples waiting for the next candidate, and why it stopped if it did."""
        state = self.trainer.state
        return {"offset": state.offset, "step": state.step, "served": state.published,
                "pending": len(state.pending), "running": self.thread.is_alive(),
                "error": self.error}  # fmt: skip

    def stop(self) -> None:
        """End the polling loop after the poll under way; the state is saved by each poll."""
        self.stopping.set()
        self.thread.join()


def trainer_actor_name(config: OnlineTrainConfig) -> str:
    return f"antiphon-trainer-{config.consumer}"


def start_trainer_actor(config: OnlineTrainConfig):
    """The named, detached trainer actor of `config` (namespace antiphon), started if it is
    not running yet; one per consumer of the log."""
    import ray

    from antiphon.policies.actor import POLICY_NAMESPACE

    return ray.remote(TrainerActor).options(
        name=trainer_actor_name(config), namespace=POLICY_NAMESPACE, get_if_exists=True,
        lifetime="detached", max_restarts=3, max_concurrency=4,
    ).remote(config.model_dump())  # fmt: skip


def logged_prefix_rollouts(config: OnlineTrainConfig):
    """Rollouts from logged prefixes through the app's coordinator deployment, verified on
    the zoo's dev items (the prompts the stream asks)."""
    from ray import serve

    from antiphon.training.online_rollouts import LoggedPrefixRollouts, queries_by_prompt
    from antiphon.training.rollouts import RolloutConfig, queries_from_tasks, serve_generate
    from antiphon.zoo.evaluate import zoo_tasks
    from antiphon.zoo.tasks import TASK_NAMES

    setup = config.rollouts
    tasks = zoo_tasks("dev", setup.tasks or config.dev.tasks or TASK_NAMES)
    coordinator = serve.get_deployment_handle("coordinator", app_name=config.dev.app)
    rollout_config = RolloutConfig(
        k=setup.k, segment_len=setup.segment_len,
        prefixes_per_query=setup.prefixes_per_request, seed=setup.seed,
    )  # fmt: skip
    queries = queries_by_prompt(queries_from_tasks(tasks))
    return LoggedPrefixRollouts(serve_generate(coordinator), queries, rollout_config)


def gate_learner_and_judge(config: OnlineTrainConfig):
    """The gate learner and its judge, the assistant scored on the app's deployment of it."""
    from ray import serve

    from antiphon.actors.client import ServeModelClient
    from antiphon.config import ModelSpec
    from antiphon.training.online_learners import GateLearner

    params = config.dev.policy_params
    assistant = ServeModelClient(
        serve.get_deployment_handle(str(params["assistant"]), app_name=config.dev.app)
    )
    base = ModelSpec(name=str(params["base"]), path=str(config.base_checkpoint))
    learner = GateLearner(base, assistant, config.train)
    return learner, gate_serving_judge(config, assistant, learner.tokenizer)
