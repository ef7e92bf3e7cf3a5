"""The online trainer of a deferral gate on real checkpoints and a real engine: the gate
learns from logged `defer` responses that earned a good outcome (the assistant scored through
its engine), the promotion gate judges it both ways, and an engine serving the store's link
reads the promoted gate at its next call and names it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from antiphon.actors.engine import ModelEngine
from antiphon.actors.gate import GATE_FILENAME, gate_fingerprint, load_gate, save_gate
from antiphon.config import ModelSpec
from antiphon.messages import SamplingParams
from antiphon.training.gate_losses import marginal_nll
from antiphon.training.online_examples import LogJoiner, SequenceExample
from antiphon.training.online_learners import GateLearner
from antiphon.training.online_trainer import OnlineTrainConfig, OnlineTrainer
from antiphon.training.turn_log import FeedbackRecord, RequestRecord, TurnLogWriter, TurnRecord

MODELS = ("base", "assistant")
TOKENS = 12


@pytest.fixture(scope="module")
def engines(tiny_model_dir, other_tiny_model_dir):
    base = ModelEngine(ModelSpec(name="base", path=str(tiny_model_dir)))
    assistant = ModelEngine(ModelSpec(name="assistant", path=str(other_tiny_model_dir)))
    yield {"base": base, "assistant": assistant}
    for engine in (base, assistant):
        asyncio.run(engine.shutdown())


def written_by(engine: ModelEngine, prompt: str, seed: int) -> tuple[int, ...]:
    """What `engine` writes after the prompt, sampled with `seed`."""

    async def go():
        s = await engine.open(prompt)
        try:
            params = SamplingParams(max_new_tokens=TOKENS, temperature=1.0, seed=seed)
            return (await engine.generate(s.session_id, params)).token_ids
        finally:
            await engine.close(s.session_id)

    return asyncio.run(go())


def logged_defer_request(request_id: str, prompt: str, writer: str, tokens, reward: float):
    """A `defer` request as the coordinator logs it (two segments), and its reward."""
    half = len(tokens) // 2
    turns = [
        TurnRecord(
            request_id=request_id,
            turn=i,
            segment=i,
            policy="defer",
            policy_version="rule",
            decision={"kind": "write_until_deferral"},
            model=writer,
            segment_kind="write" if writer == "base" else "deferred",
            token_ids=tuple(part),
            text="x" * len(part),
            logprobs=tuple(-1.0 for _ in part),
            model_finish="length",
            policy_ms=1.0,
            model_ms=1.0,
        )  # fmt: skip
        for i, part in enumerate((tokens[:half], tokens[half:]))
    ]
    done = RequestRecord(
        request_id=request_id, prompt=prompt, models=MODELS, policy="defer",
        policy_version="rule", policy_params={}, num_turns=2, num_segments=2, text="",
        finish_reason="length", error=None,
    )  # fmt: skip
    return [*turns, done, FeedbackRecord(request_id, reward)]


def traffic(engines, n: int, start: int) -> list:
    """n requests, half written by the assistant (rewarded 1), half by the base (0)."""
    records = []
    for i in range(start, start + n):
        writer = MODELS[i % 2]
        prompt = f"Q: question {i}?\nA:"
        tokens = written_by(engines[writer], prompt, seed=i)
        records += logged_defer_request(f"r{i}", prompt, writer, tokens, float(writer != "base"))
    return records


def marginal_judge(learner: GateLearner, engines) -> callable:
    """Per dev response written by the assistant: its marginal log-likelihood under a gate
    (higher where the gate defers to the model that explains it)."""
    prompts = [f"Q: dev {i}?\nA:" for i in range(8)]
    dev = [
        SequenceExample(f"d{i}", p, list(written_by(engines["assistant"], p, seed=1000 + i)), 1.0)
        for i, p in enumerate(prompts)
    ]
    data = asyncio.run(learner.features(dev, step=0))

    def evaluate(version: str) -> list[float]:
        gate = load_gate(Path(version) / GATE_FILENAME, learner.hidden_size)
        logits = data.hidden @ gate.weight + gate.bias
        return [
            -marginal_nll(logits[m], data.base_logprobs[m], data.asst_logprobs[m]).item()
            for m in (data.example == i for i in range(len(dev)))
        ]

    return evaluate


def test_sequence_examples_are_the_responses_rewarded_above_the_baseline(engines):
    joiner = LogJoiner(("defer",), learner="gate")
    records = traffic(engines, 4, start=0)
    examples = [e for r in records for e in joiner.add(r)]
    assert [e.key for e in examples] == ["r1", "r3"]  # the assistant's, rewarded 1
    kept = [r for r in records if isinstance(r, TurnRecord) and r.request_id == "r1"]
    assert examples[0].token_ids == [t for r in kept for t in r.token_ids]
    again = LogJoiner.from_state(joiner.state())
    assert again.learner == "gate" and again.add(records[-1]) == []  # a duplicate reward
    with pytest.raises(ValueError, match="unknown learner"):
        LogJoiner(learner="router")


def test_the_gate_learns_from_the_log_is_judged_both_ways_and_served_by_its_link(
    tmp_path, tiny_model_dir, engines
):
    init = tmp_path / "init"
    init.mkdir()
    save_gate(init, torch.zeros(64), bias=0.0)
    cfg = OnlineTrainConfig(
        turn_log=str(tmp_path / "turns"), store=str(tmp_path / "store"),
        state_dir=str(tmp_path / "state"), init=str(init), learner="gate",
        base_checkpoint=str(tiny_model_dir), policies=["defer"], consumer="gate-trainer",
        examples_per_candidate=10**6, replay=0, train={"steps": 100, "lr": 0.05},
        dev={"app": "unused", "models": list(MODELS),
             "policy_params": {"base": "base", "assistant": "assistant"}},
    )  # fmt: skip
    learner = GateLearner(ModelSpec(name="base", path=str(tiny_model_dir)), engines["assistant"],
                          cfg.train)  # fmt: skip
    trainer = OnlineTrainer(cfg, learner, marginal_judge(learner, engines))
    initial = trainer.served()
    served_gate = Path(cfg.store) / "served" / GATE_FILENAME
    serving = ModelEngine(ModelSpec(name="base", path=str(tiny_model_dir),
                                    gate_path=str(served_gate)))  # fmt: skip

    def gate_served_now() -> str:
        async def go():
            s = await serving.open("Q: now?\nA:")
            return (await serving.generate(s.session_id, SamplingParams(max_new_tokens=2))).gate

        return asyncio.run(go())

    try:
        before = gate_served_now()
        with TurnLogWriter(cfg.turn_log) as log:
            log.append(traffic(engines, 16, start=0))
        trainer.poll()
        better = trainer.train_pending()
        assert better.promoted, better.reason
        assert better.version.provenance["examples"] == 8  # the assistant's responses
        new_gate = load_gate(served_gate, learner.hidden_size)
        assert new_gate.bias.item() > 0  # it defers more: the assistant wrote the good ones
        assert gate_served_now() == gate_fingerprint(served_gate) != before  # no restart

        # the same traffic, rewards inverted: the base's responses look good
        bad = cfg.model_copy(update={"invert_rewards": True, "consumer": "inverted",
                                     "state_dir": str(tmp_path / "state-inverted")})  # fmt: skip
        inverted = OnlineTrainer(bad, learner, trainer.evaluate)
        inverted.poll()
        worse = inverted.train_pending()
        assert not worse.promoted, worse.reason
        assert worse.version.dev_score.mean < better.version.dev_score.mean
        assert trainer.served().version == better.version.version != initial.version
        assert gate_served_now() == gate_fingerprint(served_gate)  # still the better one
    finally:
        asyncio.run(serving.shutdown())
