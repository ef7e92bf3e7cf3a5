"""Co-LLM gate training: the gate alone on stored features, or the gate and the base model
together (full fine-tuning, or LoRA through `peft`).

    weak = fit_weak_labels(train, steps=300)                    # initialisation
    gate = fit_marginal(train, init=weak, steps=600, val=val)   # marginal likelihood
    model, gate = fit_joint(base_model, texts, asst_logprobs, init=gate, steps=200)
    save_gate(out_dir, gate.weight, gate.bias)

The gate is g = sigmoid(w . h + b) on the base's head input h (`antiphon.actors.gate`). With
the base frozen its features are fixed, so the gate alone trains full-batch on the stored
(T, H) matrix in seconds; joint training runs the base forward each step. Each fit returns
its loss curve (train, and validation where given), which the job writes and plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from antiphon.training.gate_data import GateData, GoldText, answer_positions, batch_of, head_inputs
from antiphon.training.gate_losses import marginal_nll, weak_label_loss, weak_labels


@dataclass
class GateFit:
    """A trained gate and how its training went."""

    weight: torch.Tensor  # (H,)
    bias: torch.Tensor  # ()
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "train", "val"?}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T,) gate logits of hidden states (T, H)."""
        return hidden.float() @ self.weight + self.bias

    def gates(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))


def _fit(
    data: GateData,
    loss_of,
    *,
    steps: int,
    lr: float,
    init: GateFit | None,
    val: GateData | None,
    every: int = 10,
) -> GateFit:
    """Full-batch Adam on the gate's two parameters over fixed features."""
    hidden_size = data.hidden.shape[1]
    weight = (init.weight.clone() if init else torch.zeros(hidden_size)).requires_grad_()
    bias = (init.bias.clone() if init else torch.zeros(())).requires_grad_()
    opt = torch.optim.Adam([weight, bias], lr=lr)
    curve = []
    for step in range(steps + 1):
        loss = loss_of(data, data.hidden @ weight + bias)
        if step % every == 0 or step == steps:
            point = {"step": step, "train": round(loss.item(), 5)}
            if val is not None:
                with torch.no_grad():
                    point["val"] = round(float(loss_of(val, val.hidden @ weight + bias)), 5)
            curve.append(point)
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return GateFit(weight.detach(), bias.detach(), curve)


def weak_loss(data: GateData, logits: torch.Tensor) -> torch.Tensor:
    return weak_label_loss(logits, weak_labels(data.gold, data.base_argmax, data.asst_argmax))


def marginal_loss(data: GateData, logits: torch.Tensor) -> torch.Tensor:
    return marginal_nll(logits, data.base_logprobs, data.asst_logprobs)


def fit_weak_labels(
    data: GateData, *, steps: int = 300, lr: float = 0.05, val: GateData | None = None
) -> GateFit:
    """The gate alone on the weak labels (class-weighted BCE), from zero."""
    return _fit(data, weak_loss, steps=steps, lr=lr, init=None, val=val)


def fit_marginal(
    data: GateData,
    *,
    init: GateFit | None,
    steps: int = 600,
    lr: float = 0.02,
    val: GateData | None = None,
) -> GateFit:
    """The gate alone on the marginal likelihood, from `init` (the weak-label gate)."""
    return _fit(data, marginal_loss, steps=steps, lr=lr, init=init, val=val)


def fit_joint(
    model: torch.nn.Module,
    texts: Sequence[GoldText],
    asst_logprobs: Sequence[Sequence[float]],
    *,
    init: GateFit,
    pad_id: int,
    steps: int = 200,
    lr: float = 3e-4,
    batch_size: int = 32,
    lora_rank: int = 0,
    seed: int = 0,
) -> tuple[torch.nn.Module, GateFit]:
    """The gate and the base model on the marginal likelihood: every parameter (lora_rank 0)
    or LoRA adapters of rank `lora_rank` on the attention projections (merged back into the
    returned model, so it saves as a plain checkpoint). Mini-batches drawn with `seed`."""
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # fmt: skip
        model = get_peft_model(model, config)
    model.train()
    weight = init.weight.clone().requires_grad_()
    bias = init.bias.clone().requires_grad_()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([*trained, weight, bias], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(steps):
        pick = torch.randperm(len(texts), generator=generator)[:batch_size].tolist()
        chunk = [texts[i] for i in pick]
        ids, mask = batch_of(chunk, pad_id)  # (B, L)
        logits, hidden = head_inputs(model, ids, mask)  # (B, L, V), (B, L, H)
        rows, cols = answer_positions(chunk)  # (T,), (T,)
        gold = torch.tensor([g for t in chunk for g in t.gold_ids])  # (T,)
        base_lp = torch.log_softmax(logits[rows, cols].float(), -1).gather(1, gold[:, None])[:, 0]
        asst_lp = torch.tensor([lp for i in pick for lp in asst_logprobs[i]])  # (T,)
        gate_logits = hidden[rows, cols].float() @ weight + bias  # (T,)
        loss = marginal_nll(gate_logits, base_lp, asst_lp)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            curve.append({"step": step, "train": round(loss.item(), 5)})
    if lora_rank:
        model = model.merge_and_unload()
    model.eval()
    return model, GateFit(weight.detach(), bias.detach(), curve)
