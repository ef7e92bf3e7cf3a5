"""Fresh rollouts from logged prefixes: denser switcher labels than a request's one reward.

A logged switch request whose query a verifier can score (a zoo task's dev item, found by
its prompt) is labelled as offline rollouts label a query (`rollouts.label_prefix`, the same
code): at a few of its segment boundaries (drawn from the request id), the prefix of the
logged writers' decisions is replayed, each candidate writes the next segment, random
switching completes each branch k times, and the verifier scores every completion. The
utilities are the candidates' mean scores, so a request that failed still says which
writer would have done better there, where reward-filtered imitation learns nothing from it.

Runs go through a `Generate` callable: the serving app's coordinator deployment
(`rollouts.serve_generate`), so they batch with live traffic on the live model deployments.
The prefix is the logged decisions (writers and segment lengths), replayed with a seed of
the request's own: under greedy decoding (the zoo's tasks but creativity) it is the logged
text; under sampling, a fresh prefix by the same decisions.

    rollouts = LoggedPrefixRollouts(serve_generate(handle), queries_by_prompt(tasks), cfg)
    examples = rollouts(logged_request)   # [] for a query no verifier knows
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from antiphon.training.online_examples import LoggedRequest
from antiphon.training.rollouts import (
    Generate,
    RolloutConfig,
    RolloutExample,
    RolloutQuery,
    example_key,
    label_prefix,
    retrying,
)


def queries_by_prompt(queries: Sequence[RolloutQuery]) -> dict[str, RolloutQuery]:
    """The queries a verifier can score, by prompt (what a request record logs)."""
    return {q.prompt: q for q in queries}


@dataclass(frozen=True)
class LoggedPrefixRollouts:
    """Labels a logged request by rollouts from its prefixes (see the module docstring);
    `config.prefixes_per_query` boundaries per request, the empty prefix among them."""

    generate: Generate
    queries: Mapping[str, RolloutQuery]
    config: RolloutConfig

    def __call__(self, logged: LoggedRequest) -> list[RolloutExample]:
        query = self.queries.get(logged.request.prompt)
        if query is None or not logged.turns:
            return []
        return asyncio.run(self.label(logged, query))

    async def label(self, logged: LoggedRequest, q: RolloutQuery) -> list[RolloutExample]:
        cfg, request = self.config, logged.request
        models = tuple(request.models)
        segments = sorted(logged.turns, key=lambda t: t.segment)
        total = sum(len(t.token_ids) for t in segments)
        rng = random.Random(f"online-rollout:{cfg.seed}:{request.request_id}")
        cuts = sorted(rng.sample(range(len(segments)), min(cfg.prefixes_per_query, len(segments))))
        seeds = [(random.Random(rng.randrange(2**63)), rng.randrange(2**31)) for _ in cuts]
        generate = retrying(self.generate)

        async def one(j: int, branch_rng: random.Random, request_seed: int) -> RolloutExample:
            decisions = ([t.model for t in segments[:j]], [len(t.token_ids) for t in segments[:j]])
            return await label_prefix(
                generate, q, models, cfg, decisions, branch_rng, request_seed,
                key=example_key(request.request_id, f"rollout{j}"), total_tokens=total,
            )  # fmt: skip

        return list(await asyncio.gather(*(one(j, *s) for j, s in zip(cuts, seeds, strict=True))))


__all__ = ["LoggedPrefixRollouts", "queries_by_prompt"]
