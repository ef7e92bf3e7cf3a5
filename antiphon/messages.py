"""What crosses the boundary of a model deployment: small frozen structs, validated on creation.

These are the only argument and result types of the engine's session operations
(`open, append, generate, score, fork, truncate, close`), with or without Ray in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from antiphon.errors import InvalidRequest

FinishReason = Literal["length", "stop", "eos", "gate"]

# A temperature this small samples the argmax anyway, and dividing logits by it overflows
# (softmax of inf is nan): below it, tokens are chosen greedily.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How `generate` picks tokens. temperature == 0 means greedy."""

    max_new_tokens: int = 32  # upper bound on tokens this call writes
    # 0 (or below GREEDY_BELOW): argmax; else sample from softmax(logits / temperature)
    temperature: float = 0.0
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0: all
    seed: int | None = None  # same seed, same session, same params -> same tokens
    stop_token_ids: tuple[int, ...] = ()  # stop after writing one of these (it is returned)
    stop_strings: tuple[str, ...] = ()  # stop once the new text contains one (text is cut there)
    logprobs_top_k: int = 0  # also return this many top alternatives per position
    gate_threshold: float | None = None  # stop before the first token whose gate >= this (1: never)
    # thresholds of this call's first tokens (a warm-up); gate_threshold after them
    gate_warmup: tuple[float, ...] = ()
    ignore_eos: bool = False  # keep writing past the tokenizer's end-of-sequence token
    # OpenAI's penalties: each token's logit minus frequency x its count in the response so
    # far and presence x (count > 0); in [-2, 2]
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit in [-100, 100])
    grammar: str | None = None  # an llguidance grammar the response must match (structured output)
    # where the response starts in the session: penalties count tokens from there, and the
    # grammar matches the text from there (needed with either)
    response_start: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidRequest(
                f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"
            )
        if not 0.0 <= self.temperature < math.inf:
            raise InvalidRequest(
                f"temperature must be a finite number >= 0, got {self.temperature!r}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0, got {self.top_k!r}")
        if self.logprobs_top_k < 0 or self.logprobs_top_k > 20:
            raise InvalidRequest(f"logprobs_top_k must be in [0, 20], got {self.logprobs_top_k!r}")
        if self.gate_threshold is not None and not 0.0 <= self.gate_threshold <= 1.0:
            raise InvalidRequest(f"gate_threshold must be in [0, 1], got {self.gate_threshold!r}")
        if self.gate_warmup and self.gate_threshold is None:
            raise InvalidRequest("gate_warmup needs a gate_threshold to warm up to")
        if any(not 0.0 <= t <= 1.0 for t in self.gate_warmup):
            raise InvalidRequest(
                f"gate_warmup thresholds must be in [0, 1], got {self.gate_warmup!r}"
            )
        if any(not s for s in self.stop_strings):
            raise InvalidRequest("stop_strings must not contain an empty string")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value!r}")
        for token, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequest(
                    f"logit_bias of token {token} must be in [-100, 100], got {bias!r}"
                )
        if self.reads_response and self.response_start is None:
            raise InvalidRequest("penalties and a grammar need the response_start")

    @property
    def samples(self) -> bool:
        """Tokens are drawn from the distribution (with a generator), not the argmax."""
        return self.temperature >= GREEDY_BELOW

    @property
    def reads_response(self) -> bool:
        """The call's token choice depends on the response so far (penalties, a grammar)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.grammar)

    def gate_threshold_at(self, i: int) -> float | None:
        """The gate threshold before this call's token i (0-based)."""
        return self.gate_warmup[i] if i < len(self.gate_warmup) else self.gate_threshold


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Where a session stands after an operation."""

    session_id: str  # opaque; names the replica that holds the cache when served by Ray
    length: int  # tokens in the session (prompt + everything appended or generated)


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of one `generate` call. The tokens are already appended to the session."""

    session_id: str
    token_ids: tuple[int, ...]  # the new tokens, in order
    text: str  # the new tokens decoded (cut at a stop string if one matched)
    logprobs: tuple[float, ...]  # log p(token_i | prefix) under the sampling model, per token
    top_logprobs: tuple[
        tuple[tuple[int, float], ...], ...
    ] = ()  # per token: (id, logprob) best first
    gates: tuple[float, ...] = ()  # gate value before each token; one more if finish_reason=="gate"
    gate: str = ""  # the fingerprint of the gate that gave them ("" when the model has none)
    finish_reason: FinishReason = "length"
    length: int = 0  # session length after the call
    new_tokens_computed: int = 0  # positions the model ran forward on in this call (cache check)


@dataclass(frozen=True, slots=True)
class TeacherForced:
    """The result of `teacher_force`: per given token, its log p and the model's own argmax
    at that position (what Co-LLM's gate training reads of its assistant)."""

    logprobs: tuple[float, ...]
    argmax: tuple[int, ...]
    top: tuple[tuple[tuple[int, float], ...], ...] = ()  # per token, when asked: (id, log p)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a caller needs to know about the checkpoint behind a deployment."""

    name: str
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    tokenizer_fingerprint: str  # equal fingerprints -> token ids can be exchanged as they are
    device: str
    dtype: str
    gate_fingerprint: str = ""  # hash of the deferral gate's file; "" when it carries none

    @property
    def has_gate(self) -> bool:
        return bool(self.gate_fingerprint)


def as_token_ids(ids: object, vocab_size: int, what: str = "token ids") -> list[int]:
    """Check token ids against a vocabulary; raise InvalidRequest naming the bad one."""
    if not isinstance(ids, (list, tuple)):
        raise InvalidRequest(f"{what} must be a list of integers, got {type(ids).__name__}")
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int):
            raise InvalidRequest(f"{what}[{i}] must be an integer, got {t!r}")
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"{what}[{i}] = {t} is outside the vocabulary [0, {vocab_size})")
        out.append(t)
    return out


__all__ = [
    "FinishReason",
    "SamplingParams",
    "SessionInfo",
    "Generation",
    "ModelInfo",
    "TeacherForced",
    "as_token_ids",
]
