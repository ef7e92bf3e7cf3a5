"""Token choice and stop checks: pure functions on logits and text, no model, no state.

`choose_tokens` picks one token per row of a (B, V) logits batch. Greedy rows are an argmax
over the whole batch at once; sampled rows are drawn one by one, each with its own
`torch.Generator` (seeded per call), so a seed gives the same tokens whatever else shares
the batch. Reported log-probs are the model's own (log-softmax of the raw logits, before
temperature / top-k / top-p), so they equal what `score` returns for the same tokens.
"""

from __future__ import annotations

import torch

from antiphon.messages import SamplingParams


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one generate call: seeded, or from fresh entropy when seed is None."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw a token id from logits (V,) with temperature, top-k and top-p (temperature > 0)."""
    scaled = logits.float().cpu() / params.temperature
    if 0 < params.top_k < scaled.numel():
        kth_best = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        # drop a token when the ones before it already hold top_p; the best one always stays
        drop_sorted = mass_before >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    shaped: torch.Tensor | None = None,
) -> tuple[list[int], list[float], torch.Tensor]:
    """Pick a token for every row of logits (B, V); from `shaped` (B, V) instead where the
    call's logits processors changed them (`antiphon.actors.logits`). Sampled rows draw with
    their generator (greedy rows need none: theirs may be None).

    Returns the token ids, their log-probs under the model (of `logits`), and the log-prob
    matrix (B, V) (on the logits' device) for callers that want top-k alternatives.
    """
    choice = logits if shaped is None else shaped
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    tokens = torch.argmax(choice, dim=-1)  # (B,) greedy choice for every row
    sampled = [i for i, p in enumerate(params) if p.samples]
    if sampled:
        tokens = tokens.cpu()
        for i in sampled:
            tokens[i] = sample_one(choice[i], params[i], generators[i])
        tokens = tokens.to(logits.device)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]  # (B,)
    return tokens.tolist(), chosen.tolist(), logprobs


def top_alternatives(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely (id, log-prob) pairs of one row (V,), best first."""
    values, ids = torch.topk(logprobs, k)
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


def find_stop_string(text: str, stop_strings: tuple[str, ...]) -> int | None:
    """Index in text where the earliest stop string starts, or None if none occurs."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None
