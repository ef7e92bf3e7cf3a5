"""Training of the `trained_router` baseline: one model per query, chosen from the query
alone, fitted to how each single model did on the dev queries.

    outcomes = asyncio.run(single_model_outcomes(coordinator.generate, queries, models))
    report = train_router(outcomes, models, "runs/router")

Loss: -log of the router's total probability of the models that scored best on the query;
queries where every model scored the same are left out (nothing to prefer).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from antiphon.coordinator.request import GenerationRequest
from antiphon.policies.router import RouterWeights, query_features
from antiphon.training.rollouts import Generate, RolloutQuery, label_from_utilities, retrying


@dataclass(frozen=True)
class QueryOutcome:
    key: str
    task: str
    prompt: str
    scores: tuple[float, ...]  # per model, in ensemble order: its answers' utility


async def single_model_outcomes(
    generate: Generate,
    queries: Sequence[RolloutQuery],
    models: Sequence[str],
    seed: int = 0,
    concurrency: int = 16,
) -> list[QueryOutcome]:
    """Each model alone (`fixed`) on each query: its `q.samples` answers (seeds differ), scored
    by the query's utility (its task's metric over them)."""
    limit = asyncio.Semaphore(concurrency)
    generate = retrying(generate)

    async def answer(q: RolloutQuery, model: str, j: int) -> str:
        request = GenerationRequest(
            prompt=q.prompt,
            models=tuple(models),
            policy="fixed",
            policy_params={"model": model},
            max_tokens=q.max_tokens,
            temperature=q.temperature,
            seed=seed + j,
        )
        async with limit:
            return (await generate(request)).text

    async def one(q: RolloutQuery, model: str) -> float:
        texts = await asyncio.gather(*(answer(q, model, j) for j in range(q.samples)))
        return q.utility(texts)

    scores = await asyncio.gather(*(one(q, m) for q in queries for m in models))
    n = len(models)
    return [
        QueryOutcome(q.key, q.task, q.prompt, tuple(scores[i * n : (i + 1) * n]))
        for i, q in enumerate(queries)
    ]


def train_router(
    outcomes: Sequence[QueryOutcome],
    models: Sequence[str],
    out_dir: str | Path,
    dim: int = 2048,
    max_n: int = 3,
    epochs: int = 300,
    lr: float = 0.5,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the router (full-batch AdamW on the informative queries), save it, report the
    share of training queries routed to one of their best models."""
    torch.manual_seed(seed)
    rows = [o for o in outcomes if len(set(o.scores)) > 1]
    n = len(models)
    weights = RouterWeights(tuple(models), torch.zeros(n, dim), torch.zeros(n), max_n)
    if rows:
        x = torch.stack([query_features(o.prompt, dim, max_n) for o in rows])  # (N, dim)
        best = torch.zeros(len(rows), n, dtype=torch.bool)  # (N, n)
        for i, o in enumerate(rows):
            best[i, label_from_utilities(o.scores)[0]] = True
        w = torch.zeros(n, dim, requires_grad=True)
        b = torch.zeros(n, requires_grad=True)
        opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):
            logp = torch.log_softmax(x @ w.T + b, dim=-1)  # (N, n)
            loss = -torch.logsumexp(logp.masked_fill(~best, float("-inf")), dim=-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights = RouterWeights(tuple(models), w.detach(), b.detach(), max_n)
        pred = (x @ weights.weight.T + weights.bias).argmax(-1)
        train_acc = float(best[torch.arange(len(rows)), pred].float().mean())
    else:
        train_acc = float("nan")
    weights.save(out_dir)
    report = {"queries": len(outcomes), "informative": len(rows), "train_accuracy": train_acc}
    (Path(out_dir) / "router_training.json").write_text(json.dumps(report, indent=2))
    return report
