"""Fresh rollouts from logged prefixes, on zoo checkpoints through a real coordinator: a
logged switch request of a zoo dev query is labelled by the offline rollouts' code from its
own prefixes (the logged writers' segments, replayed), the same labels each time, and the
trainer adds them to its examples."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from antiphon.actors.engine import ModelEngine
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.training.online_examples import LogJoiner
from antiphon.training.online_learners import SwitchLearner
from antiphon.training.online_rollouts import LoggedPrefixRollouts, queries_by_prompt
from antiphon.training.online_trainer import OnlineTrainConfig, OnlineTrainer, examples_judge
from antiphon.training.rollouts import RolloutConfig, queries_from_tasks
from antiphon.training.turn_log import FeedbackRecord, FileTurnSink, TurnLogWriter, read_records
from antiphon.zoo.evaluate import zoo_tasks
from tests.training.test_online_trainer import dev_examples

MODELS = ("sft", "strong")
CONFIG = RolloutConfig(k=2, segment_len=4, prefixes_per_query=3, seed=0)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo_coordinator():
    engines = {m: ModelEngine(ModelSpec(name=m, path=f"zoo:{m}")) for m in MODELS}
    tokenizers = {m: load_tokenizer(f"zoo:{m}") for m in MODELS}
    yield engines, tokenizers
    for engine in engines.values():
        asyncio.run(engine.shutdown())


def test_a_logged_request_is_labelled_by_rollouts_from_its_own_prefixes(
    zoo_coordinator, tmp_path, tiny_model_dir
):
    engines, tokenizers = zoo_coordinator
    task = zoo_tasks("dev", ["knowledge"])["knowledge"]
    task = dataclasses.replace(task, items=task.items[:3])
    queries = queries_by_prompt(queries_from_tasks({"knowledge": task}))
    item = task.items[1]
    log = tmp_path / "turns"
    with TurnLogWriter(log) as writer:
        logging = Coordinator(engines, tokenizers, turn_sink=FileTurnSink(writer))
        result = asyncio.run(logging.generate(GenerationRequest(
            request_id="logged-1", prompt=item.prompt, models=MODELS, policy="random_switch",
            policy_params={"segment_len": 4, "seed": 3}, max_tokens=task.max_new_tokens,
        )))  # fmt: skip
        writer.append([FeedbackRecord("logged-1", 0.0)])  # a failure: nothing to imitate
    assert len(result.segments) == 3
    joiner = LogJoiner(("random_switch",))
    logged = None
    for record, _ in read_records(log):
        assert joiner.add(record) == []
        logged = joiner.rewarded_now or logged
    assert logged is not None and logged.request.request_id == "logged-1"

    rollouts = LoggedPrefixRollouts(Coordinator(engines, tokenizers).generate, queries, CONFIG)
    examples = rollouts(logged)
    assert [e.key for e in examples] == [f"logged-1:rollout{j}" for j in range(3)]
    for j, e in enumerate(examples):
        logged_prefix = result.segments[:j]
        # the prefix is the logged one: its writers, and (greedy) its text
        assert e.prefix == [(MODELS.index(s.model), s.text) for s in logged_prefix]
        assert e.prefix_tokens == sum(len(s.token_ids) for s in logged_prefix)
        assert e.models == list(MODELS) and e.task == "knowledge"
        assert all(len(branch) == CONFIG.k for branch in e.scores)
        assert e.utilities == pytest.approx([sum(b) / len(b) for b in e.scores])  # mean-verified
        assert e.best == [i for i, u in enumerate(e.utilities) if u == max(e.utilities)]
    # where the failed request's first writer was chosen, the other one answers right
    assert examples[0].utilities == [0.0, 1.0]
    assert rollouts(logged) == examples  # seeds from the request id: the same labels again
    unknown = dataclasses.replace(
        logged, request=dataclasses.replace(logged.request, prompt="Q: unknown?")
    )
    assert rollouts(unknown) == []  # no verifier for it: no rollouts

    # the trainer adds the informative ones to what it learns from
    cfg = OnlineTrainConfig(
        turn_log=str(log), store=str(tmp_path / "store"), state_dir=str(tmp_path / "state"),
        init=str(tiny_model_dir), policies=["random_switch"], examples_per_candidate=10**6,
        dev={"examples": str(dev_examples(tmp_path / "dev"))},
    )  # fmt: skip
    trainer = OnlineTrainer(cfg, SwitchLearner(cfg.train), examples_judge(cfg.dev.examples),
                            rollouts=rollouts)  # fmt: skip
    trainer.poll()
    assert [e["key"] for e in trainer.state.pending] == ["logged-1:rollout0"]
