"""Co-LLM's gate losses, the gate fits on fixed features and the threshold search (pure: no
model, no engine)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from antiphon.training.gate_data import GateData
from antiphon.training.gate_losses import (
    defer_posterior,
    marginal_nll,
    weak_label_loss,
    weak_labels,
)
from antiphon.training.gate_thresholds import (
    ThresholdPoint,
    best_point,
    never_defer_warning,
    sweep,
    thresholds_at_rates,
)
from antiphon.training.gate_training import fit_marginal, fit_weak_labels


def test_weak_labels_mark_where_only_the_assistant_is_right():
    gold = torch.tensor([5, 5, 5, 5])
    base = torch.tensor([5, 1, 1, 5])
    asst = torch.tensor([5, 5, 2, 2])
    assert weak_labels(gold, base, asst).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_weak_label_loss_weighs_each_class_as_a_whole():
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    # a gate that gets only the rare class wrong costs as much as one wrong on all the others
    wrong_rare = weak_label_loss(torch.tensor([-3.0, -3.0, -3.0, -3.0]), labels)
    wrong_common = weak_label_loss(torch.tensor([3.0, 3.0, 3.0, 3.0]), labels)
    assert float(wrong_rare) == pytest.approx(float(wrong_common), rel=1e-6)
    # and a right gate costs little
    assert weak_label_loss(torch.tensor([3.0, -3.0, -3.0, -3.0]), labels) < wrong_rare / 10


def test_marginal_nll_is_the_mixture_likelihood():
    logits = torch.tensor([0.3, -1.2])
    base_lp = torch.log(torch.tensor([0.6, 0.1]))
    asst_lp = torch.log(torch.tensor([0.2, 0.9]))
    g = torch.sigmoid(logits)
    by_hand = -torch.log((1 - g) * base_lp.exp() + g * asst_lp.exp()).mean()
    assert marginal_nll(logits, base_lp, asst_lp) == pytest.approx(float(by_hand), rel=1e-6)
    # the gradient raises the gate where the assistant explains the token better
    logits.requires_grad_()
    marginal_nll(logits, base_lp, asst_lp).backward()
    assert logits.grad[0] > 0 and logits.grad[1] < 0  # descent: gate down on 0, up on 1
    post = defer_posterior(logits.detach(), base_lp, asst_lp)
    assert post[1] > g[1] and post[0] < g[0]


def synthetic_data(n: int = 400, seed: int = 0) -> GateData:
    """Tokens whose first feature says whether the assistant knows them."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 8, generator=gen)
    helps = hidden[:, 0] > 0.8  # the assistant is right, the base wrong
    gold = torch.zeros(n, dtype=torch.long)
    base_lp = torch.where(helps, math.log(0.02), math.log(0.9))
    asst_lp = torch.where(helps, math.log(0.9), math.log(0.3))
    return GateData(
        hidden=hidden, gold=gold, base_logprobs=base_lp, base_argmax=torch.where(helps, 1, 0),
        asst_logprobs=asst_lp, asst_argmax=torch.zeros(n, dtype=torch.long),
        example=torch.arange(n), position=torch.zeros(n, dtype=torch.long),
        keys=[str(i) for i in range(n)],
    )  # fmt: skip


def test_the_fits_learn_where_to_defer_and_the_marginal_likelihood_improves_on_the_init():
    data = synthetic_data()
    train, val = data.where(range(300)), data.where(range(300, 400))
    weak = fit_weak_labels(train, steps=200, val=val)
    gates = weak.gates(val.hidden)
    helps = val.hidden[:, 0] > 0.8
    assert gates[helps].min() > gates[~helps].max() - 0.5  # separated on held-out tokens
    assert gates[helps].mean() > 0.7 and gates[~helps].mean() < 0.3
    ml = fit_marginal(train, init=weak, steps=200, val=val)
    assert ml.curve[-1]["val"] < ml.curve[0]["val"]  # the likelihood improved from the init
    assert ml.curve[0]["step"] == 0 and "train" in ml.curve[-1]


def test_thresholds_sit_at_the_gate_quantiles():
    gates = torch.linspace(0.0, 0.99, 100)
    pairs = dict(thresholds_at_rates(gates, (0.0, 0.25, 1.0)))
    assert pairs[0.0] == 1.0 and pairs[1.0] == 0.0  # never / always
    assert (gates >= pairs[0.25]).float().mean() == pytest.approx(0.25, abs=0.02)


def test_the_sweep_keeps_the_best_score_and_the_lower_rate_on_ties():
    measured = {1.0: (10.0, 0.0), 0.5: (30.0, 0.2), 0.2: (30.0, 0.4), 0.0: (5.0, 1.0)}

    async def evaluate(eta: float) -> tuple[float, float]:
        return measured[eta]

    points = asyncio.run(sweep(evaluate, [(0.0, 1.0), (0.3, 0.5), (0.5, 0.2), (1.0, 0.0)]))
    assert [p.eta for p in points] == [1.0, 0.5, 0.2, 0.0]
    best = best_point(points)
    assert (best.eta, best.deferral_rate) == (0.5, 0.2)
    assert never_defer_warning(points, best) is None


def test_a_best_threshold_that_never_defers_is_said_loudly():
    points = [ThresholdPoint(0.0, 1.0, 20.0, 0.0), ThresholdPoint(0.5, 0.3, 12.0, 0.4)]
    best = best_point(points)
    warning = never_defer_warning(points, best)
    assert best.deferral_rate == 0.0
    assert warning is not None and "NEVER DEFERS" in warning and "12.0" in warning


def test_joint_training_with_lora_returns_a_plain_checkpoint_and_a_gate(tiny_model_dir):
    from antiphon.checkpoint import load_checkpoint
    from antiphon.config import ModelSpec
    from antiphon.training.gate_data import GoldText
    from antiphon.training.gate_training import GateFit, fit_joint

    model, tok = load_checkpoint(ModelSpec(name="m", path=str(tiny_model_dir)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = [GoldText(str(i), tuple(tok("Q: hi?\nA:")["input_ids"]), (40 + i, 41, 2))
             for i in range(4)]  # fmt: skip
    asst = [[-0.1, -5.0, -0.2]] * 4
    init = GateFit(torch.zeros(64), torch.zeros(()))
    trained, gate = fit_joint(model, texts, asst, init=init, pad_id=tok.pad_token_id, steps=5,
                              lr=1e-2, batch_size=2, lora_rank=4)  # fmt: skip
    assert type(trained).__name__ == "LlamaForCausalLM"  # adapters merged back
    assert set(trained.state_dict()) == set(before)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted projections
    assert not torch.equal(gate.weight, init.weight) and len(gate.curve) >= 1
