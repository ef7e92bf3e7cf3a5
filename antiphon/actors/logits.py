"""What a generate call's settings do to a model's logits before the token choice: small
units behind one interface, applied in order to one row of logits (V,).

    processors = logits_processors(params, response_ids, grammar_tokenizer)
    for p in processors: logits = p(logits)     # then the sampler picks a token
    for p in processors: p.accept(token)        # the token written, whoever chose it

Log-probs reported to callers stay the model's own (of the raw logits): a bias or a grammar
changes which token is written, not what the model thought of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from antiphon.actors.grammar import GrammarMatcher
from antiphon.messages import SamplingParams


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (V,) -> logits (V,) of the next token (a new tensor, or logits changed)."""
        ...

    def accept(self, token: int) -> None:
        """The token written at this position."""
        ...


class LogitBias:
    """Adds a fixed value to chosen tokens' logits (OpenAI's `logit_bias`; -100 bans one)."""

    def __init__(self, bias: Sequence[tuple[int, float]]) -> None:
        self.ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
        self.values = torch.tensor([b for _, b in bias], dtype=torch.float32)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, self.ids.to(logits.device), self.values.to(logits))

    def accept(self, token: int) -> None:
        pass


class RepetitionPenalty:
    """OpenAI's presence and frequency penalties over the response so far: a token's logit
    minus frequency x its count, minus presence if it occurred at all."""

    def __init__(self, presence: float, frequency: float, response_ids: Sequence[int]) -> None:
        self.presence, self.frequency = presence, frequency
        self.counts = Counter(response_ids)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.counts:
            return logits
        ids = torch.tensor(list(self.counts), dtype=torch.long, device=logits.device)
        counts = torch.tensor(list(self.counts.values()), dtype=torch.float32)
        penalty = self.frequency * counts + self.presence
        return logits.index_add(0, ids, -penalty.to(logits))

    def accept(self, token: int) -> None:
        self.counts[token] += 1


class GrammarMask:
    """Only the tokens a grammar takes next keep their logits; the rest get -inf."""

    def __init__(self, matcher: GrammarMatcher) -> None:
        self.matcher = matcher

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        allowed = self.matcher.allowed().to(logits.device)
        return logits.masked_fill(~allowed[: logits.numel()], float("-inf"))

    def accept(self, token: int) -> None:
        self.matcher.accept(token)


GrammarFor = Callable[[str, Sequence[int]], GrammarMatcher]  # (grammar, response ids) -> matcher


def logits_processors(
    params: SamplingParams, session_ids: Sequence[int], grammar_for: GrammarFor
) -> list[LogitsProcessor]:
    """The processors a call's settings ask for, given its session's tokens."""
    response = session_ids[params.response_start or 0 :]
    processors: list[LogitsProcessor] = []
    if params.logit_bias:
        processors.append(LogitBias(params.logit_bias))
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            RepetitionPenalty(params.presence_penalty, params.frequency_penalty, response)
        )
    if params.grammar is not None:
        processors.append(GrammarMask(grammar_for(params.grammar, response)))
    return processors


def apply_processors(
    logits: torch.Tensor, processors: Sequence[Sequence[LogitsProcessor]]
) -> torch.Tensor:
    """Logits (B, V) with each row's processors applied (the input itself when none)."""
    if not any(processors):
        return logits
    rows = list(logits.float().unbind(0))
    for i, row_processors in enumerate(processors):
        for processor in row_processors:
            rows[i] = processor(rows[i])
    return torch.stack(rows)
