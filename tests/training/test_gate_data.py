"""Gate training data from real engines and checkpoints: the assistant's teacher forcing
through the engine, the base's features in this process, and the two agree with what serving
computes (a gate trained on these features fires at serving time where it was trained to)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from antiphon.actors.engine import ModelEngine
from antiphon.actors.gate import save_gate
from antiphon.checkpoint import load_checkpoint
from antiphon.config import ModelSpec
from antiphon.messages import SamplingParams
from antiphon.training.gate_data import GateData, GoldText, build_gate_data, gold_texts
from antiphon.training.gate_training import GateFit
from antiphon.zoo.tasks import TaskItem

PROMPTS = ("Q: What is the capital of Quelm?\nA:", "Q: What is 12 + 9?\nA:")


@pytest.fixture(scope="module")
def pair(tiny_model_dir, other_tiny_model_dir):
    base, tok = load_checkpoint(ModelSpec(name="base", path=str(tiny_model_dir)))
    assistant = ModelEngine(ModelSpec(name="assistant", path=str(other_tiny_model_dir)))
    ref_assistant, _ = load_checkpoint(ModelSpec(name="ref", path=str(other_tiny_model_dir)))
    yield base, tok, assistant, ref_assistant
    asyncio.run(assistant.shutdown())


def test_teacher_forcing_matches_a_plain_forward_pass(pair):
    base, tok, assistant, ref = pair
    items = [(f"t/{i}", TaskItem(p, "The answer is Blorv.")) for i, p in enumerate(PROMPTS)]
    texts = gold_texts(items, tok)
    assert all(t.gold_ids[-1] == tok.eos_token_id for t in texts)
    data = asyncio.run(build_gate_data(base, tok.pad_token_id, assistant, texts, {"x": 1}))
    assert len(data) == sum(len(t.gold_ids) for t in texts)
    start = 0
    for i, t in enumerate(texts):
        ids = torch.tensor([t.prompt_ids + t.gold_ids])
        n, first = len(t.gold_ids), len(t.prompt_ids) - 1
        with torch.no_grad():
            for model, lp_name, am_name in ((ref, "asst_logprobs", "asst_argmax"),
                                            (base, "base_logprobs", "base_argmax")):  # fmt: skip
                logp = torch.log_softmax(model(ids).logits[0, first : first + n].float(), -1)
                gold = torch.tensor(t.gold_ids)
                got = getattr(data, lp_name)[start : start + n]
                assert torch.allclose(got, logp.gather(1, gold[:, None])[:, 0], atol=1e-4)
                assert (
                    getattr(data, am_name)[start : start + n].tolist() == logp.argmax(-1).tolist()
                )
        assert (data.example[start : start + n] == i).all()
        assert data.position[start : start + n].tolist() == list(range(n))
        start += n
    assert data.provenance["x"] == 1 and data.provenance["tokens"] == len(data)


def test_features_are_what_the_served_gate_reads(pair, tiny_model_dir, tmp_path):
    """The gold text is what the gated base writes itself; the gate over the stored features
    equals the gates the engine reported while writing it."""
    base, tok, assistant, _ = pair
    weight = torch.randn(64, generator=torch.Generator().manual_seed(9))
    gate_file = save_gate(tmp_path / "gate.safetensors", weight, bias=0.2)
    served = ModelEngine(ModelSpec(name="g", path=str(tiny_model_dir), gate_path=str(gate_file)))

    async def written():
        s = await served.open(PROMPTS[0])
        g = await served.generate(s.session_id, SamplingParams(max_new_tokens=12, ignore_eos=True))
        await served.shutdown()
        return g

    gen = asyncio.run(written())
    prompt_ids = tuple(tok(PROMPTS[0])["input_ids"])
    texts = [GoldText("t/0", prompt_ids, gen.token_ids + (tok.eos_token_id,))]
    data = asyncio.run(build_gate_data(base, tok.pad_token_id, assistant, texts, {}))
    gates = GateFit(weight, torch.tensor(0.2)).gates(data.hidden)[: len(gen.token_ids)]
    assert torch.allclose(gates, torch.tensor(gen.gates), atol=1e-4)


def test_stored_data_loads_back_and_splits_by_example(pair, tmp_path):
    base, tok, assistant, _ = pair
    items = [(f"t/{i}", TaskItem(p, "Yes.")) for i, p in enumerate(PROMPTS)]
    data = asyncio.run(
        build_gate_data(base, tok.pad_token_id, assistant, gold_texts(items, tok), {"a": "b"})
    )
    back = GateData.load(data.save(tmp_path / "d"))
    assert back.keys == data.keys and back.provenance == data.provenance
    assert torch.equal(back.hidden, data.hidden) and torch.equal(back.gold, data.gold)
    second = back.where([1])
    assert set(second.example.tolist()) == {1} and len(second) == len(items[1][1].reference) + 2
