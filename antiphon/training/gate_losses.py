"""The losses of Co-LLM's gate, pure tensor functions (no model, no data loading).

For gold tokens x_t with the base's log p_base(x_t), the frozen assistant's log p_asst(x_t)
and the gate's logit z_t (g_t = sigmoid(z_t)), all (T,):

- `weak_labels`: Z_t = 1 where the assistant's argmax is the gold token and the base's is not
  (the initialisation's pseudo-labels);
- `weak_label_loss`: class-weighted binary cross-entropy of the gate on those labels (the
  rare class "defer" weighs as much in total as the common one);
- `marginal_nll`: minus the marginal log-likelihood of the gold tokens with Z_t latent,
  log P(x_t) = logsumexp(log(1-g_t) + log p_base(x_t), log g_t + log p_asst(x_t)),
  averaged over tokens. Its gradient moves g_t towards the posterior P(Z_t=1 | x_t): the gate
  learns to defer where the assistant explains the gold token better than the base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weak_labels(
    gold: torch.Tensor, base_argmax: torch.Tensor, asst_argmax: torch.Tensor
) -> torch.Tensor:
    """(T,) float 1.0 where the assistant is right and the base wrong, else 0.0."""
    return ((asst_argmax == gold) & (base_argmax != gold)).float()


def weak_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class-weighted BCE: each class carries half the loss, however rare it is."""
    positives = labels.sum()
    negatives = labels.numel() - positives
    # weight per token: 1/(2 n_class) of its class; a class with no tokens weighs nothing
    weight = torch.where(
        labels > 0.5,
        0.5 / positives.clamp(min=1.0),
        0.5 / negatives.clamp(min=1.0),
    )
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (weight * losses).sum()


def marginal_nll(
    logits: torch.Tensor, base_logprobs: torch.Tensor, asst_logprobs: torch.Tensor
) -> torch.Tensor:
    """Mean over tokens of -log((1-g) p_base(x) + g p_asst(x)), g = sigmoid(logits)."""
    own = F.logsigmoid(-logits) + base_logprobs  # log(1-g) + log p_base
    deferred = F.logsigmoid(logits) + asst_logprobs  # log g + log p_asst
    return -torch.logaddexp(own, deferred).mean()


def defer_posterior(
    logits: torch.Tensor, base_logprobs: torch.Tensor, asst_logprobs: torch.Tensor
) -> torch.Tensor:
    """P(Z_t = 1 | x_t) under the current gate: where the marginal likelihood says to defer."""
    own = F.logsigmoid(-logits) + base_logprobs
    deferred = F.logsigmoid(logits) + asst_logprobs
    return torch.sigmoid(deferred - own)
