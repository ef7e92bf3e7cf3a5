"""The tiny build end to end: train every model, save in HF format, load back through
transformers and the engine, generate; deterministic and resumable."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.messages import SamplingParams
from antiphon.zoo import NAMES
from antiphon.zoo.build import BUILD_ORDER, build_zoo, install_checkpoints

pytestmark = pytest.mark.slow


def test_every_model_is_a_loadable_hf_checkpoint(tiny_zoo):
    assert set(BUILD_ORDER) == set(NAMES)
    for name in NAMES:
        d = tiny_zoo / name
        assert (d / "model.safetensors").exists() and (d / "config.json").exists()
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d)
        ids = tok("Q: What is 2 + 3?\nA:", return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] > ids.shape[1]
        assert (
            tok.apply_chat_template(
                [{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True
            )
            == "Q: Hi?\nA:"
        )
    assert json.loads((tiny_zoo / "zoo.json").read_text())["scale"] == "tiny"
    # The alternative-tokenizer model really has another vocabulary.
    alt = AutoTokenizer.from_pretrained(tiny_zoo / "alt-tok")
    base = AutoTokenizer.from_pretrained(tiny_zoo / "base")
    assert alt.get_vocab() != base.get_vocab()


def test_models_load_and_generate_through_the_engine(tiny_zoo):
    async def run():
        engine = ModelEngine(ModelSpec(name="aligned", path=str(tiny_zoo / "aligned")))
        try:
            s = await engine.open("Q: What is 2 + 3?\nA:")
            g = await engine.generate(s.session_id, SamplingParams(max_new_tokens=8))
            return g
        finally:
            await engine.shutdown()

    g = asyncio.run(run())
    assert 1 <= len(g.token_ids) <= 8


def test_build_is_deterministic_and_resumable(tiny_zoo, tmp_path):
    # Same seed, another directory, only the models that need nothing else: same weights.
    again = build_zoo(tmp_path / "again", "tiny", seed=0, only=["base", "guide-untuned"])
    for name in ("base", "guide-untuned"):
        a = load_file(tiny_zoo / name / "model.safetensors")
        b = load_file(again / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # A resumed build skips finished models and continues an interrupted one from its state.
    done = again / "_build" / "base.done"
    mtime = (again / "base" / "model.safetensors").stat().st_mtime_ns
    (again / "_build" / "guide-untuned.done").unlink()
    build_zoo(again, "tiny", seed=0, only=["base", "guide-untuned"])
    assert done.exists() and (again / "base" / "model.safetensors").stat().st_mtime_ns == mtime
    b = load_file(again / "guide-untuned" / "model.safetensors")
    a = load_file(tiny_zoo / "guide-untuned" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="seed=0 scale=tiny"):
        build_zoo(again, "tiny", seed=1)


def test_install_copies_a_finished_zoo_only(tiny_zoo, tmp_path):
    dest = install_checkpoints(tiny_zoo, tmp_path / "checkpoints")
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(NAMES)
    assert not list(dest.rglob("*.done")) and not list(dest.rglob("*.pt"))
    with pytest.raises(ValueError, match="not a finished zoo"):
        install_checkpoints(tmp_path / "checkpoints", tmp_path / "elsewhere")
