"""Logit fusion baselines: every token is drawn from the average of the ensemble's next-token
distributions, or (with `coefficients`) from a weighted sum of their log-probabilities, the
logit arithmetic of proxy tuning (large + small tuned - small untuned). Models that share one
tokenizer.

Not a `Policy`: a policy picks who writes a segment, and fusion has no writer -- every token
is a joint decision. `FusionGenerator` is a `generate(prompt, sampling) -> text` callable for
the evaluation harness (`antiphon.zoo.evaluate`), driving any `SessionModel`s (the engines in
process, or the Serve clients): per token, one `next_token_logprobs` call per model (over the
whole vocabulary) and one `append` of the chosen token, models in parallel. Over Serve that is
two round trips per token and model, which is what fusion costs without a fused kernel; in
process (how the experiment runs it) it is a forward pass per token and model. The token is
chosen from the fused distribution by the engine's own sampler (`antiphon.actors.sampling`:
greedy, or temperature, top-k and top-p with a seeded generator); stop strings are not
applied.

    fused = FusionGenerator({"base": engine_b, "aligned": engine_a}, tokenizer)
    text = await fused("Q: 2+2?\\nA:", SamplingParams(max_new_tokens=16))
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from antiphon.actors.protocol import SessionModel
from antiphon.actors.sampling import choose_tokens, new_generator
from antiphon.errors import InvalidRequest
from antiphon.messages import SamplingParams


def arithmetic(logprobs: Sequence[Sequence[float]], coefficients: Sequence[float]) -> torch.Tensor:
    """(V,) sum_m c_m log p_m, renormalised: proxy tuning's combination of the models."""
    lp = torch.tensor(logprobs, dtype=torch.float64)  # (M, V)
    c = torch.tensor(coefficients, dtype=torch.float64)  # (M,)
    return torch.log_softmax((c[:, None] * lp).sum(0), dim=0)


def fuse(
    logprobs: Sequence[Sequence[float]], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """(V,) log of the weighted mean of the models' next-token distributions."""
    lp = torch.tensor(logprobs, dtype=torch.float64)  # (M, V)
    w = torch.tensor(weights if weights is not None else [1.0] * len(lp), dtype=torch.float64)
    return torch.logsumexp(lp + torch.log(w / w.sum())[:, None], dim=0)


class FusionGenerator:
    """Averaged next-token distributions of same-tokenizer models, token by token."""

    def __init__(
        self,
        models: Mapping[str, SessionModel],
        tokenizer: PreTrainedTokenizerBase,
        weights: Sequence[float] | None = None,
        coefficients: Sequence[float] | None = None,
    ) -> None:
        if len(models) < 2:
            raise InvalidRequest("logit fusion needs at least two models")
        if weights is not None and coefficients is not None:
            raise InvalidRequest("give mixture weights or logit coefficients, not both")
        for given in (weights, coefficients):
            if given is not None and len(given) != len(models):
                raise InvalidRequest(f"{len(given)} weights for {len(models)} models")
        self.models = dict(models)
        self.tokenizer = tokenizer  # the models' shared tokenizer (decodes the fused tokens)
        self.weights = weights
        self.coefficients = coefficients
        self._checked: tuple[int, tuple[int, ...], int] | None = None  # vocab, eos ids, context

    async def _vocab(self) -> tuple[int, tuple[int, ...], int]:
        if self._checked is None:
            infos = await asyncio.gather(*(m.info() for m in self.models.values()))
            if len({i.tokenizer_fingerprint for i in infos}) != 1:
                raise InvalidRequest("logit fusion needs models that share one tokenizer")
            context = min(i.max_context for i in infos)
            self._checked = (infos[0].vocab_size, infos[0].eos_token_ids, context)
        return self._checked

    async def __call__(self, prompt: str, sampling: SamplingParams) -> str:
        vocab, eos, context = await self._vocab()
        models = list(self.models.values())
        opened = await asyncio.gather(*(m.open(prompt) for m in models))
        sessions = [s.session_id for s in opened]
        # Like a single model, stop when the shortest context is full (finish "length").
        room = context - max(s.length for s in opened)
        generator = new_generator(sampling.seed if sampling.seed is not None else 0)
        everything = list(range(vocab))
        written: list[int] = []
        try:
            for _ in range(min(sampling.max_new_tokens, room)):
                lps = await asyncio.gather(
                    *(
                        m.next_token_logprobs(s, everything)
                        for m, s in zip(models, sessions, strict=True)
                    )
                )
                if self.coefficients is not None:
                    fused = arithmetic(lps, self.coefficients)  # (V,) log-probs
                else:
                    fused = fuse(lps, self.weights)  # (V,) log-probs, used as logits
                (token,), _, _ = choose_tokens(fused[None], [sampling], [generator])
                if token in eos and not sampling.ignore_eos:
                    break
                written.append(token)
                await asyncio.gather(
                    *(m.append(s, [token]) for m, s in zip(models, sessions, strict=True))
                )
        finally:
            await asyncio.gather(*(m.close(s) for m, s in zip(models, sessions, strict=True)))
        return self.tokenizer.decode(written, skip_special_tokens=True)
