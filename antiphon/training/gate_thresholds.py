"""Choosing eta, the gate's threshold, on validation data (never the test split).

As in Co-LLM: thresholds at deferral rates 0, 10, ..., 100% of the validation gold tokens
(the gate's quantiles there), each run as the real `defer` policy on the validation items;
the best task score wins, ties going to the lower deferral rate (less assistant compute).
When the best is "never defer", the search says so loudly: the gate learned nothing the
threshold could use (users of the reference code hit this, clinicalml/co-llm#5).

    points = await sweep(evaluate, thresholds_at_rates(gates_on_val))
    best = best_point(points); warning = never_defer_warning(points, best)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RATES = tuple(i / 10 for i in range(11))  # target deferral rates of the sweep


@dataclass(frozen=True)
class ThresholdPoint:
    """One eta of the sweep and what it gave on validation."""

    target_rate: float  # the share of validation gold tokens whose gate reaches eta
    eta: float
    score: float  # mean task score over the validation tasks, 0-100
    deferral_rate: float  # share of generated tokens the assistant wrote

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def thresholds_at_rates(
    gates: torch.Tensor, rates: Sequence[float] = RATES
) -> list[tuple[float, float]]:
    """(rate, eta) with eta the gate's (1 - rate) quantile: rate 0 never defers (eta 1),
    rate 1 always does (eta 0)."""
    out = []
    for rate in rates:
        if rate <= 0.0:
            eta = 1.0
        elif rate >= 1.0:
            eta = 0.0
        else:
            eta = float(torch.quantile(gates.float(), 1.0 - rate))
        out.append((rate, min(1.0, max(0.0, eta))))
    return out


async def sweep(
    evaluate: Callable[[float], Awaitable[tuple[float, float]]],
    thresholds: Sequence[tuple[float, float]],
) -> list[ThresholdPoint]:
    """Run `evaluate(eta) -> (score, deferral rate)` at each threshold, in order."""
    points = []
    for rate, eta in thresholds:
        score, measured = await evaluate(eta)
        points.append(ThresholdPoint(rate, eta, score, measured))
    return points


def best_point(points: Sequence[ThresholdPoint]) -> ThresholdPoint:
    """The highest score; among equal scores the lowest deferral rate."""
    return max(points, key=lambda p: (round(p.score, 6), -p.deferral_rate))


def never_defer_warning(points: Sequence[ThresholdPoint], best: ThresholdPoint) -> str | None:
    """A message when the best threshold defers nothing, else None."""
    if best.deferral_rate > 0.0:
        return None
    others = max((p.score for p in points if p.deferral_rate > 0.0), default=None)
    return (
        f"THE BEST THRESHOLD NEVER DEFERS: eta={best.eta:.4f} scores {best.score:.1f} on "
        f"validation with no deferral (best score with deferral: {others}). The gate does "
        "not find tokens where the assistant helps: check the pair, the training data and "
        "its loss curve before serving it."
    )


def plot_sweep(curves: dict[str, Sequence[ThresholdPoint]], path: Path, title: str) -> Path:
    """Validation score against deferral rate, one line per gate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([100 * p.deferral_rate for p in points], [p.score for p in points], "o-",
                label=name)  # fmt: skip
    ax.set_xlabel("deferral rate on validation (% of tokens by the assistant)")
    ax.set_ylabel("validation score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
