"""Logit fusion baselines: every token is drawn from the average of the ensemble's next-token
distributions, or (with `coefficients`) from a weighted sum of their log-probabilities, the
logit arithmetic of proxy tuning (large + small tuned - small untuned). Models that share one
tokenizer.

Not a `Policy`: a policy picks who writes a segment, and fusion has no writer -- every token
is a joint decision. `FusionGenerator` is a `generate(prompt, sampling) -> text` callable for
the evaluation harness (`antiphon.zoo.evaluate`), driving any `SessionModel`s (the engines in
process, or the Serve clients): per token, one `next_token_logprobs` call per model (over the
whole vocabulary) and one `append` of the chosen token, models in parallel. Every request in
flight on one generator steps in lockstep (one round per token), so that each engine batches
all their sessions in its passes. Over Serve that is two round trips per token and model,
which is what fusion costs without a fused kernel; in process (how the experiment runs it) it
is two batched forward passes per round and model (one caches the previous token, one reads
the distribution after the new one). The token is chosen from the fused distribution by the
engine's own sampler (`antiphon.actors.sampling`: greedy, or temperature, top-k and top-p with
a seeded generator); stop strings are not applied.

    fused = FusionGenerator({"base": engine_b, "aligned": engine_a}, tokenizer)
    text = await fused("Q: 2+2?\\nA:", SamplingParams(max_new_tokens=16))
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field

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
        self._joining: list[_Request] = []  # requests waiting for the next round
        self._stepper: asyncio.Task | None = None  # the rounds' task while any is in flight

    async def _vocab(self) -> tuple[int, tuple[int, ...], int]:
        if self._checked is None:
            infos = await asyncio.gather(*(m.info() for m in self.models.values()))
            if len({i.tokenizer_fingerprint for i in infos}) != 1:
                raise InvalidRequest("logit fusion needs models that share one tokenizer")
            context = min(i.max_context for i in infos)
            self._checked = (infos[0].vocab_size, infos[0].eos_token_ids, context)
        return self._checked

    async def __call__(self, prompt: str, sampling: SamplingParams) -> str:
        _, _, context = await self._vocab()
        models = list(self.models.values())
        opened = await asyncio.gather(*(m.open(prompt) for m in models))
        sessions = [s.session_id for s in opened]
        # Like a single model, stop when the shortest context is full (finish "length").
        room = context - max(s.length for s in opened)
        seed = sampling.seed if sampling.seed is not None else 0
        request = _Request(sessions, sampling, new_generator(seed),
                           min(sampling.max_new_tokens, room),
                           asyncio.get_running_loop().create_future())  # fmt: skip
        try:
            if request.limit > 0:
                self._joining.append(request)
                if self._stepper is None or self._stepper.done():
                    self._stepper = asyncio.create_task(self._step_all())
                await request.done
        finally:
            request.done.cancel()  # a caller gone (cancelled) leaves the steps at once
            await asyncio.gather(*(m.close(s) for m, s in zip(models, sessions, strict=True)))
        return self.tokenizer.decode(request.written, skip_special_tokens=True)

    async def _step_all(self) -> None:
        """One token of every request in flight per round, in lockstep, so that each model
        reads the next-token distributions of all their sessions in one batched pass (each
        request on its own would reach the engines at its own moment, and a pass would batch
        only the few that happened to arrive together). Requests join at a round's start."""
        active: list[_Request] = []
        try:
            await self._rounds(active)
        except Exception as e:  # a bug here fails the requests in flight instead of hanging them
            for request in active + self._joining:
                if not request.done.done():
                    request.done.set_exception(e)

    async def _rounds(self, active: list[_Request]) -> None:
        vocab, eos, _ = await self._vocab()
        everything = list(range(vocab))
        while active or self._joining:
            active[:] = [r for r in active + self._joining if not r.done.done()]
            self._joining.clear()
            # one flat gather: every call is sent before any engine starts its pass
            reads = [self._reads(r, everything) for r in active]
            results = await asyncio.gather(*(c for calls in reads for c in calls),
                                           return_exceptions=True)  # fmt: skip
            still, at = [], 0
            for request, calls in zip(active, reads, strict=True):
                got, at = results[at : at + len(calls)], at + len(calls)
                if request.done.done():
                    continue
                failed = [e for e in got if isinstance(e, BaseException)]
                if failed:  # that request's failure, not the others'
                    request.done.set_exception(failed[0])
                    continue
                lps = got[-len(self.models) :]  # the reads, not the appends
                if self.coefficients is not None:
                    fused = arithmetic(lps, self.coefficients)  # (V,) log-probs
                else:
                    fused = fuse(lps, self.weights)  # (V,) log-probs, used as logits
                sampling = request.sampling
                (token,), _, _ = choose_tokens(fused[None], [sampling], [request.generator])
                if token in eos and not sampling.ignore_eos:
                    request.done.set_result(None)
                    continue
                request.written.append(token)
                if len(request.written) == request.limit:
                    request.done.set_result(None)
                else:
                    still.append(request)
            active[:] = still

    def _reads(self, request: _Request, everything: list[int]) -> list[Awaitable]:
        """The calls of one round for `request`: per model, its last chosen token appended,
        then per model the log-probs of every vocabulary token next (the last len(models)
        calls). The engine keeps a session's calls in order, so each read follows its append."""
        pairs = list(zip(self.models.values(), request.sessions, strict=True))
        last = request.written[-1:]
        appends = [model.append(session, last) for model, session in pairs] if last else []
        return appends + [
            model.next_token_logprobs(session, everything) for model, session in pairs
        ]


@dataclass
class _Request:
    """One fused generation in flight: its sessions (one per model, in model order), how it
    samples, and the tokens it has chosen."""

    sessions: list[str]
    sampling: SamplingParams
    generator: torch.Generator
    limit: int  # most tokens it may write
    done: asyncio.Future
    written: list[int] = field(default_factory=list)
