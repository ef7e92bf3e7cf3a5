"""Co-LLM deferral through the coordinator over real engines: the compose strategy against a
by-hand mixture, gate values and fingerprints in the turn records, the warm-up, and deferral
between models of different tokenizers (tiny models here; the zoo's alt-tok below)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from antiphon.actors.engine import ModelEngine
from antiphon.actors.gate import save_gate
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.executors.defer import at_text_boundary
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.records import TurnRecord
from antiphon.coordinator.request import GenerationRequest
from antiphon.errors import InvalidRequest
from antiphon.messages import SamplingParams
from antiphon.training.turn_log import FileTurnSink, TurnLogReader, TurnLogWriter
from tests.coordinator.conftest import live_sessions
from tests.coordinator.test_decision_shapes import gate_threshold_that_fires_sometimes
from tests.coordinator.test_loop import PROMPT


def defer_request(base: str, assistant: str, eta: float, **params) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT, models=(base, assistant), policy="defer", max_tokens=30,
        policy_params={"base": base, "assistant": assistant, "eta": eta, **params},
    )  # fmt: skip


def test_compose_writes_the_argmax_of_the_gated_mixture(engines, tokenizers):
    eta = gate_threshold_that_fires_sometimes(engines, tokenizers)
    req = defer_request("a_gated", "b", eta, strategy="compose")
    result = asyncio.run(Coordinator(engines, tokenizers).generate(req))
    prompt_ids = list(tokenizers["b"](PROMPT)["input_ids"])
    vocab = list(range(len(tokenizers["b"])))

    async def mixture(prefix: list[int], g: float) -> torch.Tensor:
        lp_base = await engines["a"].prompt_next_token_logprobs(prefix, vocab)
        lp_asst = await engines["b"].prompt_next_token_logprobs(prefix, vocab)
        return torch.logaddexp(
            torch.tensor(lp_base, dtype=torch.float64) + math.log(1 - g),
            torch.tensor(lp_asst, dtype=torch.float64) + math.log(g),
        )

    segs = result.segments
    composed = 0
    for k, seg in enumerate(segs):
        turn = [s for s in segs if s.turn == seg.turn]
        # a turn is the base's draft up to its gate, then one composed token; a turn of one
        # segment that does not end the response is a composed token alone (the gate fired
        # at the draft's first token)
        if seg is not turn[-1] or (len(turn) == 1 and k == len(segs) - 1):
            continue
        assert len(seg.token_ids) == 1 and len(seg.gates) == 1
        prefix = prompt_ids + [t for s in segs[:k] for t in s.token_ids]
        mixed = asyncio.run(mixture(prefix, seg.gates[0]))
        assert seg.token_ids[0] == int(mixed.argmax())
        assert seg.logprobs[0] == pytest.approx(float(mixed.max()), abs=1e-5)
        assert seg.kind == ("deferred" if seg.model == "b" else "write")
        composed += 1
    assert composed >= 1  # the gate fired, and each firing was composed
    assert live_sessions(engines) == 0


def test_compose_needs_one_vocabulary(engines, tokenizers):
    eta = gate_threshold_that_fires_sometimes(engines, tokenizers)
    req = defer_request("a_gated", "c", eta, strategy="compose")
    with pytest.raises(InvalidRequest, match="different tokenizers.*strategy 'defer'"):
        asyncio.run(Coordinator(engines, tokenizers).generate(req))
    assert live_sessions(engines) == 0


def test_turn_records_carry_the_gate_values_and_the_gate_fingerprint(engines, tokenizers, tmp_path):
    eta = gate_threshold_that_fires_sometimes(engines, tokenizers)
    path = tmp_path / "turns.atl"
    with TurnLogWriter(path) as writer:
        coord = Coordinator(engines, tokenizers, turn_sink=FileTurnSink(writer))
        result = asyncio.run(coord.generate(defer_request("a_gated", "b", eta)))
    turns = [r for r, _ in TurnLogReader(path) if isinstance(r, TurnRecord)]
    fingerprint = asyncio.run(engines["a_gated"].info()).gate_fingerprint
    assert fingerprint and len(turns) == len(result.segments)
    gated = [r for r in turns if r.model == "a_gated"]
    assert gated and any(r.model_finish == "gate" for r in gated)
    for r in gated:
        assert r.gate == fingerprint
        assert len(r.gates) == len(r.token_ids) + (r.model_finish == "gate")
        assert all(0.0 <= g <= 1.0 for g in r.gates)
        # the base stopped before the first gate at or above eta, and only there
        assert all(g < eta for g in r.gates[: len(r.token_ids)])
        if r.model_finish == "gate":
            assert r.gates[-1] >= eta
    deferred = [r for r in turns if r.model == "b"]
    assert deferred and all(r.segment_kind == "deferred" and r.gates == () and r.gate == ""
                            for r in deferred)  # fmt: skip


def test_eta_warms_up_from_never_to_eta(engines, tokenizers):
    """With a linear warm-up from 1 (never) over the first 8 tokens, nothing defers before the
    threshold schedule comes down to a gate the base meets."""
    eta = gate_threshold_that_fires_sometimes(engines, tokenizers)
    warm = dict(warmup_schedule="linear", warmup_steps=8, warmup_start=1.0)
    result = asyncio.run(Coordinator(engines, tokenizers).generate(
        defer_request("a_gated", "b", eta, **warm)))  # fmt: skip
    first = result.segments[0]
    assert first.model == "a_gated"

    def threshold(i: int) -> float:
        return 1.0 + (eta - 1.0) * i / 8 if i < 8 else eta

    # each token it wrote was under its step's threshold (1 never fires), and where it
    # stopped the gate met that step's threshold
    assert all(threshold(i) >= 1.0 or g < threshold(i) for i, g in
               enumerate(first.gates[: len(first.token_ids)]))  # fmt: skip
    if first.model_finish == "gate":
        assert first.gates[-1] >= threshold(len(first.token_ids))
    cold = asyncio.run(Coordinator(engines, tokenizers).generate(
        defer_request("a_gated", "b", eta)))  # fmt: skip
    assert len(first.token_ids) >= len(cold.segments[0].token_ids)


# ----- different tokenizers: the zoo's sft (characters) and alt-tok (words) -----------------


@pytest.fixture(scope="module")
def zoo_pair(tmp_path_factory):
    gate = save_gate(tmp_path_factory.mktemp("gate") / "gate.safetensors",
                     torch.randn(128, generator=torch.Generator().manual_seed(5)))  # fmt: skip
    built = {
        "sft": ModelEngine(ModelSpec(name="sft", path="zoo:sft", gate_path=str(gate))),
        "alt-tok": ModelEngine(ModelSpec(name="alt-tok", path="zoo:alt-tok")),
    }
    tokenizers = {n: load_tokenizer(f"zoo:{n}") for n in built}
    yield built, tokenizers

    async def shutdown() -> None:
        for e in built.values():
            await e.shutdown()

    asyncio.run(shutdown())


def test_an_assistant_of_another_tokenizer_writes_to_the_end_of_a_word(zoo_pair):
    engines, tokenizers = zoo_pair
    prompt = "Q: What is the capital of Sassutei?\nA:"
    sft, alt = tokenizers["sft"], tokenizers["alt-tok"]
    assert len(sft) != len(alt)

    async def probe() -> float:
        s = await engines["sft"].open(prompt)
        g = await engines["sft"].generate(s.session_id, SamplingParams(max_new_tokens=40))
        await engines["sft"].close(s.session_id)
        return sorted(g.gates)[int(0.7 * len(g.gates))]

    eta = asyncio.run(probe())
    req = GenerationRequest(
        prompt=prompt, models=("sft", "alt-tok"), policy="defer", max_tokens=60,
        policy_params={"base": "sft", "assistant": "alt-tok", "eta": eta},
    )  # fmt: skip
    result = asyncio.run(Coordinator(engines, tokenizers).generate(req))
    segs = result.segments
    helped = [k for k, s in enumerate(segs) if s.model == "alt-tok"]
    assert helped, "the gate never fired: the test shows nothing"
    text = ""
    for k, seg in enumerate(segs):
        if seg.model == "alt-tok":
            assert seg.kind == "deferred"
            # whole words: it ends at a boundary, unless the response ended with it
            assert at_text_boundary(text + seg.text) or k == len(segs) - 1
            assert seg.token_ids == tuple(alt(seg.text, add_special_tokens=False)["input_ids"])
        else:
            # the base goes on from the text re-tokenized in its own tokenizer: what a fresh
            # sft session on that text writes, with the same gate
            async def fresh(prefix: str = text, n: int = len(seg.token_ids)):
                s = await engines["sft"].open(prompt + prefix)
                g = await engines["sft"].generate(
                    s.session_id, SamplingParams(max_new_tokens=n, gate_threshold=eta)
                )
                await engines["sft"].close(s.session_id)
                return g  # fmt: skip

            again = asyncio.run(fresh())
            assert again.token_ids == seg.token_ids
        text += seg.text
    assert result.text == text


def test_sampled_deferral_is_reproducible_from_the_seed(engines, tokenizers):
    eta = gate_threshold_that_fires_sometimes(engines, tokenizers)
    coord = Coordinator(engines, tokenizers)

    def answer(seed: int, strategy: str):
        req = defer_request("a_gated", "b", eta, strategy=strategy)
        req = req.model_copy(update={"temperature": 1.0, "seed": seed})
        return [(s.model, s.token_ids) for s in asyncio.run(coord.generate(req)).segments]

    for strategy in ("defer", "compose"):
        first = answer(3, strategy)
        assert answer(3, strategy) == first  # same seed, same answer, writer by writer
        assert {m for m, _ in first} == {"a_gated", "b"}
        assert any(answer(s, strategy) != first for s in (4, 5, 6))
