"""Weak-to-strong search (`w2s_search`): chunk-level beam search CBS(W, K, L) over a frozen
proposer, steered by a small tuned/untuned guide pair (the executor,
`antiphon.coordinator.executors.search`, runs the beams and scores them).

Every turn is one search step: W*K first chunks from the prompt, then each of the W kept
beams expanded K ways, L proposer tokens per chunk, until every beam has ended or the budget
is spent. Best-of-N is the same search with W=1, K=N and no chunk limit (`chunk_len` null:
one chunk is the whole response); unguided sampling is the proposer writing alone (`fixed`).

    build_policy("w2s_search", {"proposer": "strong", "tuned": "guide-tuned",
                                "untuned": "guide-untuned", "width": 4, "successors": 4,
                                "chunk_len": 8})
"""

from __future__ import annotations

from pydantic import Field, model_validator

from antiphon.policies.base import Decision, SearchStep
from antiphon.policies.baselines import RULE_VERSION, PolicyParams
from antiphon.sequence import SequenceView


class W2SSearchParams(PolicyParams):
    proposer: str = Field(min_length=1, description="Model every token is sampled from.")
    tuned: str = Field(min_length=1, description="Small tuned guide (+ log p).")
    untuned: str = Field(min_length=1, description="Small untuned guide (- log p).")
    width: int = Field(default=4, ge=1, le=64, description="W: beams kept per step.")
    successors: int = Field(default=4, ge=1, le=64, description="K: children per beam.")
    chunk_len: int | None = Field(
        default=8,
        ge=1,
        description="L: proposer tokens per chunk; null: the whole response in one chunk "
        "(with width 1 and successors N, Best-of-N).",
    )
    temperature: float = Field(default=1.0, gt=0.0, description="Proposer sampling temperature.")

    @model_validator(mode="after")
    def _three_models(self) -> W2SSearchParams:
        roles = [self.proposer, self.tuned, self.untuned]
        if len(set(roles)) < 3:
            raise ValueError(f"proposer, tuned and untuned must be three different models: {roles}")
        return self

    def referenced_models(self) -> tuple[str, ...]:
        return (self.proposer, self.tuned, self.untuned)


class W2SSearch:
    """Every turn is one search step with fixed W, K, L, until all beams end."""

    name = "w2s_search"
    version = RULE_VERSION

    def __init__(self, params: W2SSearchParams) -> None:
        self.params = params

    async def decide(self, view: SequenceView) -> Decision:
        p = self.params
        # No chunk limit: one chunk is the rest of the budget (fixed for the whole search,
        # so a settled search and the next step are told apart by their shape).
        chunk_len = p.chunk_len if p.chunk_len is not None else max(1, view.max_tokens)
        return SearchStep(
            p.proposer, p.tuned, p.untuned, p.width, p.successors, chunk_len, p.temperature
        )
