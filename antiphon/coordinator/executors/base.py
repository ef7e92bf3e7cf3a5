"""What every executor is: `run(decision, state) -> Outcome` for its own kind of decision,
and `settle(state) -> Outcome` for work still pending when another decision (or the end of the
request) comes. The turn is `decide -> run -> apply`; executors never change the state, they
say what to commit (`antiphon.coordinator.commit.Outcome`).

An executor is made per request (`ExecutionContext` gives it the request's sessions and
sampling settings), so it may keep state between turns: the search keeps its beams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from antiphon.coordinator.commit import Outcome, Trim
from antiphon.coordinator.request import GenerationRequest
from antiphon.coordinator.sessions import RequestSessions
from antiphon.errors import InvalidRequest
from antiphon.messages import ModelInfo, SamplingParams
from antiphon.policies.base import Decision
from antiphon.sequence import SequenceState


def derive_seed(seed: int | None, *parts: int) -> int | None:
    """A distinct, reproducible seed per (request seed, turn, child): same seed, same output."""
    if seed is None:
        return None
    h = seed
    for p in parts:
        h = (h * 1_000_003 + p + 1) % (2**62)
    return h


@dataclass(frozen=True)
class ExecutionContext:
    """What executors of one request share."""

    request: GenerationRequest
    sessions: RequestSessions
    trim: Trim  # cuts a segment at a stop string (for executors that commit in steps)

    def __post_init__(self) -> None:
        check_logit_bias(self.request, self.sessions.infos)

    def sampling(
        self,
        model: str,
        max_new: int,
        *,
        seed_parts: tuple[int, ...],
        sample_seed: int | None = None,
        **kw: object,
    ) -> SamplingParams:
        """The request's sampling settings for one call of `model`, with a seed of its own,
        derived from `sample_seed` if given, else from the request's seed (penalties and a
        grammar read the response from the end of its prompt)."""
        r = self.request
        root = r.seed if sample_seed is None else sample_seed
        fields = dict(
            max_new_tokens=max_new,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            seed=derive_seed(root, *seed_parts),
            stop_strings=r.stop,
            presence_penalty=r.presence_penalty,
            frequency_penalty=r.frequency_penalty,
            logit_bias=tuple(sorted(r.logit_bias.items())),
            grammar=r.grammar,
            logprobs_top_k=r.top_logprobs,
            response_start=len(self.sessions.prompt_ids(model)),
        )
        fields.update(kw)
        return SamplingParams(**fields)


def check_logit_bias(request: GenerationRequest, infos: Mapping[str, ModelInfo]) -> None:
    """A logit bias names token ids, which mean one thing only in one vocabulary: every model
    of the ensemble must share it, and hold each id (InvalidRequest otherwise)."""
    if not request.logit_bias:
        return
    vocabularies = {infos[m].tokenizer_fingerprint for m in request.models}
    if len(vocabularies) > 1:
        raise InvalidRequest(
            f"logit_bias: the ensemble {list(request.models)} mixes tokenizers, so a token "
            "id names different tokens for different writers"
        )
    vocab_size = min(infos[m].vocab_size for m in request.models)
    outside = sorted(t for t in request.logit_bias if t >= vocab_size)
    if outside:
        raise InvalidRequest(
            f"logit_bias: token ids {outside[:5]} are outside the vocabulary of {vocab_size}"
        )


class Executor(Protocol):
    """Runs one kind of decision for one request."""

    async def run(self, decision: Decision, state: SequenceState) -> Outcome:
        """Carry the decision out on the model sessions; say what to commit."""
        ...

    async def settle(self, state: SequenceState) -> Outcome:
        """End work left pending by earlier decisions (search beams): what to commit now."""
        ...


class Stateless:
    """Base of executors that finish each decision within its turn: nothing to settle."""

    async def settle(self, state: SequenceState) -> Outcome:
        return Outcome()
