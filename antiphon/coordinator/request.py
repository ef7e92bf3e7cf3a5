"""What goes into the coordinator (`GenerationRequest`) and what comes out of it
(`SegmentEvent` per segment while streaming, one `FinishEvent` at the end, or a whole
`GenerationResult`).

The HTTP ingress builds a `GenerationRequest` from its API body (chat messages are rendered
to prompt text by the caller), e.g.

    req = GenerationRequest.parse({"prompt": "Q: 2+2=", "models": ["base", "aligned"],
                                   "policy": "round_robin", "policy_params": {"segment_len": 8}})

`parse` turns every validation error into `InvalidRequest` naming the field.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from antiphon.errors import InvalidRequest, validation_message
from antiphon.sequence import Segment, SegmentKind, SequenceFinishReason, SequenceState


def _new_request_id() -> str:
    return uuid.uuid4().hex


class GenerationRequest(BaseModel):
    """One collaborative generation: who writes (ensemble + policy), from what, how much."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    request_id: str = Field(
        default_factory=_new_request_id,
        min_length=1,
        max_length=128,
        description="Id that names this request in the turn log and in feedback.",
    )
    prompt: str = Field(description="Prompt text; chat messages already rendered by the caller.")
    models: tuple[str, ...] = Field(
        min_length=1, description="The ensemble: names of the models that may write, in order."
    )
    policy: str = Field(default="round_robin", description="Registry name of the policy.")
    policy_params: dict[str, JsonValue] = Field(
        default_factory=dict, description="The policy's parameters (validated by its registry)."
    )
    max_tokens: int = Field(default=256, ge=1, description="Response token budget.")
    temperature: float = Field(
        default=0.0, ge=0.0, allow_inf_nan=False, description="0 (or below 1e-5) means greedy."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus mass kept.")
    top_k: int = Field(default=0, ge=0, description="Keep the k most likely tokens; 0: all.")
    seed: int | None = Field(default=None, description="Seed for sampling and seeded policies.")
    stop: tuple[str, ...] = Field(
        default=(), max_length=16, description="Stop strings; the text is cut before the first."
    )
    presence_penalty: float = Field(
        default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Lowers the logit of every token the response already holds.",
    )  # fmt: skip
    frequency_penalty: float = Field(
        default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Lowers a token's logit by this times its count in the response so far.",
    )  # fmt: skip
    logit_bias: dict[int, float] = Field(
        default_factory=dict, max_length=300,
        description="Token id (in the ensemble's one vocabulary) -> added to its logit, "
        "in [-100, 100].",
    )  # fmt: skip
    grammar: str | None = Field(
        default=None,
        description="An llguidance grammar every writer's text must follow (structured output; "
        "`antiphon.actors.grammar.response_format_grammar`).",
    )
    top_logprobs: int = Field(
        default=0, ge=0, le=20, description="Also each token's most likely alternatives."
    )
    resume: tuple[Segment, ...] = Field(
        default=(),
        description="Segments already streamed to the client by a coordinator replica that "
        "died mid-request: the run continues after them (set by the ingress, never by a body).",
    )

    @field_validator("models")
    @classmethod
    def _models_unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"model names must be unique, got {list(v)}")
        if any(not m for m in v):
            raise ValueError("model names must be non-empty")
        return v

    @model_validator(mode="after")
    def _resumed_by_the_ensemble(self) -> GenerationRequest:
        strangers = sorted({s.model for s in self.resume} - set(self.models))
        if strangers:
            raise ValueError(f"resumed segments written by models {strangers} not in the ensemble")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, v: dict[int, float]) -> dict[int, float]:
        for token, bias in v.items():
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} is negative")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias of token {token}: {bias} is outside [-100, 100]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    def initial_state(self) -> SequenceState:
        """The sequence state this request starts from: nothing written yet, or the resumed
        segments and the turn after the last of them."""
        return SequenceState(
            request_id=self.request_id,
            prompt=self.prompt,
            models=self.models,
            max_tokens=self.max_tokens,
            stop=self.stop,
            seed=self.seed,
            segments=self.resume,
            turn=max(s.turn for s in self.resume) + 1 if self.resume else 0,
        )

    @classmethod
    def parse(cls, data: Mapping[str, object]) -> GenerationRequest:
        """Validate a JSON-like mapping; errors become `InvalidRequest` naming the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise InvalidRequest(validation_message(e, "request")) from None


@dataclass(frozen=True, slots=True)
class SegmentEvent:
    """Streamed once per committed segment, in order. It carries the whole segment (token ids
    included), so whoever relays a stream can resume it on another coordinator replica."""

    request_id: str
    index: int  # position of the segment in the response (0, 1, ...)
    segment: Segment  # committed: text already cut at a stop string if one ended the response

    @property
    def turn(self) -> int:
        """Index of the decision that produced the segment."""
        return self.segment.turn

    @property
    def model(self) -> str:
        """Who wrote it."""
        return self.segment.model

    @property
    def kind(self) -> SegmentKind:
        return self.segment.kind

    @property
    def text(self) -> str:
        return self.segment.text

    @property
    def token_count(self) -> int:
        """Its tokens, in the writer's tokenizer."""
        return len(self.segment.token_ids)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int  # prompt length in the first ensemble model's tokenizer
    completion_tokens: int  # sum of segment lengths, each in its writer's tokenizer
    tokens_by_model: dict[str, int] = field(default_factory=dict)  # completion tokens per model

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, segments: Sequence[Segment], prompt_tokens: int) -> Usage:
        """The usage of a response made of `segments`."""
        by_model: dict[str, int] = {}
        for seg in segments:
            by_model[seg.model] = by_model.get(seg.model, 0) + len(seg.token_ids)
        return cls(prompt_tokens, sum(by_model.values()), by_model)


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The last item of a stream: why the response ended, and its usage."""

    request_id: str
    finish_reason: SequenceFinishReason
    usage: Usage


StreamEvent = SegmentEvent | FinishEvent


@dataclass(frozen=True, slots=True)
class GenerationResult:
    request_id: str
    text: str  # the whole response
    segments: tuple[Segment, ...]  # who wrote what, in order (texts concatenate to `text`)
    finish_reason: SequenceFinishReason
    usage: Usage
    policy: str  # policy name
    policy_version: str  # carried by the last decision

    @classmethod
    def of(cls, state: SequenceState, usage: Usage, policy: str, version: str) -> GenerationResult:
        """The result of a request whose sequence ended in `state`."""
        return cls(
            state.request_id, state.text, state.segments, state.finish_reason or "policy",
            usage, policy, version,
        )  # fmt: skip


def openai_finish_reason(reason: SequenceFinishReason) -> Literal["stop", "length"]:
    """The OpenAI API's two values: 'length' for a spent budget, 'stop' for everything else."""
    return "length" if reason == "length" else "stop"
