"""Switcher training on hand-made labels: a training step lowers the loss, full fine-tune and
LoRA both save a plain HF checkpoint, and the `switch` policy then follows what the trained
switcher prefers (labels always "1" -> it picks the second model)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from antiphon.actors.engine import ModelEngine
from antiphon.checkpoint import load_checkpoint
from antiphon.config import ModelSpec
from antiphon.policies import build_policy
from antiphon.policies.base import WriteSegment
from antiphon.training.switcher_training import (
    ADAPTER_DIR,
    SwitcherTrainConfig,
    collate,
    encode,
    grouped_batches,
    index_logprobs,
    load_init,
    switcher_loss,
    train_switcher,
)
from tests.policies.test_switcher import view
from tests.switch_models import examples


def test_one_step_lowers_the_loss(tiny_model_dir):
    torch.manual_seed(0)
    model, tok = load_init(str(tiny_model_dir), None)
    batch = collate(encode(tok, examples(8), 512), tok.pad_token_id, 2)
    ids = [tok.convert_tokens_to_ids(c) for c in "01"]
    before = switcher_loss(index_logprobs(model, batch, ids), batch["best"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = switcher_loss(index_logprobs(model, batch, ids), batch["best"])
    assert after < before


def test_full_fine_tune_learns_the_labels_and_saves_hf(trained_switcher):
    out, report = trained_switcher
    assert report.steps == 3 * -(-report.train_examples // 8) and report.val_examples > 0
    assert sum(report.losses[-3:]) / 3 < sum(report.losses[:3]) / 3
    assert report.val_accuracy == 1.0
    saved = json.loads((out / "switcher_training.json").read_text())
    assert saved["report"]["val_accuracy"] == 1.0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_the_lr_schedule_is_applied_and_a_bad_one_is_refused(tiny_model_dir, tmp_path):
    """Under a warmup the first step's lr is 0: one step leaves the weights as they were, where
    the constant lr moves them; a schedule the trainer cannot step is refused up front."""
    init = load_file(tiny_model_dir / "model.safetensors")
    moved = {}
    for schedule in ("constant", "linear"):
        cfg = SwitcherTrainConfig(batch_size=8, max_steps=1, val_fraction=0.0,
                                  lr_schedule=schedule, warmup_ratio=0.9)  # fmt: skip
        train_switcher(examples(8), str(tiny_model_dir), tmp_path / schedule, cfg, progress=False)
        after = load_file(tmp_path / schedule / "model.safetensors")
        moved[schedule] = any(not torch.equal(after[k], v) for k, v in init.items())
    assert moved == {"constant": True, "linear": False}
    for bad in ({"lr_schedule": "reduce_lr_on_plateau"}, {"warmup_ratio": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SwitcherTrainConfig(**bad)


def test_lora_trains_adapters_and_saves_merged_weights(tiny_model_dir, tmp_path):
    cfg = SwitcherTrainConfig(epochs=2, batch_size=8, lr=1e-2, lora_r=4, val_fraction=0.0)
    report = train_switcher(examples(16), str(tiny_model_dir), tmp_path, cfg, progress=False)
    assert report.losses[-1] < report.losses[0]
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("lora" in k for k in saved)
    base = load_file(tiny_model_dir / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[key], base[key])  # the adapter was merged in
    assert torch.equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # the adapter alone is a PEFT adapter directory over the init checkpoint, and it loads as
    # any checkpoint does (with the tokenizer of its base when it ships none), as the merged
    adapter = tmp_path / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert Path(config["base_model_name_or_path"]) == Path(tiny_model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (adapter / name).unlink()
    unmerged, tokenizer = load_checkpoint(ModelSpec(name="adapter", path=str(adapter)))
    merged, _ = load_checkpoint(ModelSpec(name="merged", path=str(tmp_path)))
    ids = torch.tensor([tokenizer("Once upon a time")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(unmerged(ids).logits, merged(ids).logits, atol=1e-5)


def test_policy_follows_the_trained_switcher(trained_switcher):
    out, _ = trained_switcher
    engine = ModelEngine(ModelSpec(name="sw", path=str(out)))
    from antiphon.policies.switcher import Switch, SwitchParams

    policy = Switch(SwitchParams(switcher_path=str(out), segment_len=5), model=engine)
    views = [view([], models=("a", "b")), view([("a", "hello"), ("b", "abc")], models=("a", "b"))]

    async def decide_all():
        try:
            return [await policy.decide(v) for v in views], await policy.distribution(views[0])
        finally:
            await engine.shutdown()

    decisions, probs = asyncio.run(decide_all())
    assert decisions == [WriteSegment("b", 5, speculate=True)] * 2
    assert probs[1] > 0.9
    registered = build_policy("switch", {"switcher_path": str(out)}, ("a", "b"))
    assert registered.name == "switch" and registered.version == policy.version


def test_batches_hold_similar_lengths_and_an_epoch_reads_every_example_once():
    lengths = [random.Random(i).randint(10, 1000) for i in range(200)]
    batches = grouped_batches(lengths, 16, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert sorted(map(len, batches)) == [8] + [16] * 12

    def padded(bs):  # tokens the batches read, each padded to its longest prompt
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    shuffled = list(range(200))
    random.Random(0).shuffle(shuffled)
    at_random = [shuffled[i : i + 16] for i in range(0, 200, 16)]
    assert padded(batches) < 0.75 * padded(at_random)
    # seeded: the same rng gives the same epoch, another rng another one
    assert grouped_batches(lengths, 16, random.Random(0)) == batches
    assert grouped_batches(lengths, 16, random.Random(1)) != batches
