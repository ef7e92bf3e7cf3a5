"""The HTTP API's bodies: the native `/v1/generate` and feedback, and the OpenAI-compatible
completions, chat completions and models. Shared by the ingress (which validates requests
with them) and `antiphon.Client` (which parses responses with them).

Only pydantic here, no Ray or FastAPI, so the client stays light to import.

Native request (`POST /v1/generate`), every field but prompt/messages optional:
    {"prompt": "Once upon", "ensemble": "default", "policy": "round_robin",
     "policy_params": {"segment_length": 8}, "max_tokens": 64, "temperature": 0.0,
     "stream": false}
Response: {"id", "ensemble", "policy", "text", "segments": [{"index", "model", "text",
"num_tokens", "kind", "turn", "logprobs", "gates"}], "finish_reason", "usage"}. With
"stream": true the body is server-sent events: one `event: segment` per segment (data: a
Segment), then one `event: done` (data: the full response); a failure after the stream
began arrives as `event: error` (data: an ErrorBody).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from antiphon.actors.grammar import response_format_grammar
from antiphon.config import PolicyParamValue

Role = Literal["system", "user", "assistant"]


MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n x prompts of one OpenAI request; each choice runs as its own request
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_TOP_LOGPROBS = 5  # alternatives per token of a completion, as OpenAI allows


# The turn log (msgpack) holds integers in [-2**63, 2**64): a request's numbers must fit.
INTEGER_RANGE = (-(2**63), 2**64 - 1)


def unloggable(value: object, path: str = "") -> str | None:
    """Where a JSON value holds what no tokenizer or turn log can take: text that is not
    valid Unicode (a lone UTF-16 surrogate, which JSON's \\ud800 escapes allow) or an
    integer outside 64 bits. A message naming the field; None if nowhere."""
    where = path or "body"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            char = f"U+{ord(value[e.start]):04X} at character {e.start}"
            return f"{where}: lone surrogate {char}; text must be valid Unicode"
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = INTEGER_RANGE
        if not low <= value <= high:
            return f"{where}: integer {value} outside [{low}, {high}]"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = unloggable(key, path) if isinstance(key, str) else None
        found = found or unloggable(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class _Body(BaseModel):
    """A request body: every string (keys too) valid Unicode and every integer within 64
    bits, so what no tokenizer or log can encode is a 400 naming the field, not a 500 or a
    turn record dropped further in. Only the top-level bodies carry it (through `_Strict`
    and `SamplingFields`): one walk covers the messages and parts inside."""

    @model_validator(mode="before")
    @classmethod
    def _loggable(cls, data: object) -> object:
        problem = unloggable(data)
        if problem:
            raise ValueError(problem)
        return data


class _Strict(_Body):
    """Native API bodies: unknown keys are client mistakes (400 naming the key)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Lenient(BaseModel):
    """OpenAI API bodies: keys we do not implement (user, logit_bias, ...) are ignored, as
    OpenAI clients send some of them by default."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# --- shared pieces ---------------------------------------------------------------------------


class ChatMessage(_Lenient):
    """One chat turn; content may be a string or OpenAI content parts (text parts only)."""

    role: Role = Field(description="Who wrote the message.")
    content: str | list[TextPart] = Field(description="Text, or a list of text parts.")

    def text(self) -> str:
        """The message's content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TextPart(_Lenient):
    """An OpenAI content part; only text parts are accepted."""

    type: Literal["text"] = Field(description="Part type; only 'text' is supported.")
    text: str = Field(description="The text.")


ChatMessage.model_rebuild()


class SamplingFields(_Body):
    """Sampling options common to every generation endpoint."""

    max_tokens: int | None = Field(
        default=None, ge=1, description="Token budget of the whole response (default: server's)."
    )
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        allow_inf_nan=False,
        description="0 or unset: greedy; > 0: sample at this temperature (below 1e-5: greedy).",
    )
    top_p: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Nucleus mass kept; 0 keeps only the most likely token (greedy).",
    )  # fmt: skip
    top_k: int | None = Field(default=None, ge=0, description="Keep the k best tokens; 0: all.")
    seed: int | None = Field(default=None, description="Seed for sampling (reproducible runs).")
    stop: str | list[str] | None = Field(
        default=None, description="Stop once the response contains one of these strings."
    )
    presence_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Lowers the logit of every token the response already holds (each "
        "writer counts the response in its own tokens).",
    )  # fmt: skip
    frequency_penalty: float | None = Field(
        default=None, ge=-2.0, le=2.0, allow_inf_nan=False,
        description="Lowers a token's logit by this times its count in the response so far.",
    )  # fmt: skip
    logit_bias: dict[int, float] | None = Field(
        default=None,
        description="Token id -> a value in [-100, 100] added to its logit; for ensembles "
        "whose models share one tokenizer.",
    )
    response_format: ResponseFormat | None = Field(
        default=None,
        description="Structured output: 'json_object', or 'json_schema' with a schema; "
        "whichever model writes a turn is held to it (JSON without whitespace).",
    )
    policy: str | None = Field(
        default=None, description="Policy name overriding the ensemble's default policy."
    )
    policy_params: dict[str, PolicyParamValue] | None = Field(
        default=None,
        description="Parameters of the policy (merged over the default's if the "
        "policy is the ensemble's own).",
    )

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for token, bias in (v or {}).items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(
                    f"logit_bias: token {token} -> {bias}; ids are >= 0, values in [-100, 100]"
                )
        return v

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is None:
            return v
        stops = [v] if isinstance(v, str) else v
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_LENGTH:
            raise ValueError(
                f"a stop string may have at most {MAX_STOP_LENGTH} characters, got {len(longest)}"
            )
        return v

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (a single string is one stop string)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema (`strict` and `name` are taken as given)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(default=None, description="The schema's name (no effect).")
    description: str | None = Field(default=None, description="What it is for (no effect).")
    json_schema: dict[str, JsonValue] = Field(
        default_factory=dict, alias="schema", description="The JSON Schema of the answer."
    )
    strict: bool | None = Field(default=None, description="Always strict here.")


class ResponseFormat(BaseModel):
    """`response_format` of an OpenAI request."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"] = Field(description="The format.")
    json_schema: JsonSchemaFormat | None = Field(
        default=None, description="With type 'json_schema': the schema."
    )

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type 'json_schema', and only then")
        return self

    def grammar(self) -> str | None:
        """Its llguidance grammar (None: plain text); InvalidRequest if the schema has none."""
        schema = None if self.json_schema is None else self.json_schema.json_schema
        return response_format_grammar(self.type, schema)


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int = Field(description="Tokens of the prompt (of the first model).")
    completion_tokens: int = Field(description="Tokens written by all models together.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class Segment(BaseModel):
    """A stretch of the response written by one model in one turn."""

    index: int = Field(description="Position of the segment in the response (0, 1, ...).")
    model: str = Field(description="Name of the model that wrote it.")
    text: str = Field(description="The segment's text.")
    num_tokens: int = Field(description="Tokens in the segment (of the writing model).")
    kind: str = Field(
        default="write",
        description="'write' (chosen writer), 'deferred' (written after a deferral) or 'search'.",
    )
    turn: int | None = Field(
        default=None,
        description="Index of the policy decision that produced it (the segments of one "
        "decision share it); null from a server that does not send it.",
    )
    logprobs: list[float] = Field(
        default_factory=list,
        description="Each of its tokens' log-prob under the writer's sampling, in order.",
    )
    gates: list[float] = Field(
        default_factory=list,
        description="The writer's deferral gate value before each token (one more when it "
        "stopped at its gate); empty when the writer carries no gate.",
    )


# --- native API ------------------------------------------------------------------------------


class GenerateRequest(SamplingFields, _Strict):
    """Body of `POST /v1/generate`: give exactly one of prompt and messages."""

    prompt: str | None = Field(default=None, description="Plain-text prompt.")
    messages: list[ChatMessage] | None = Field(
        default=None, description="Chat messages, rendered with the tokenizer's chat template."
    )
    ensemble: str | None = Field(default=None, description="Ensemble name (default: the first).")
    stream: bool = Field(default=False, description="Answer with server-sent events.")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self


class GenerateResponse(BaseModel):
    """Body of a non-streamed `/v1/generate` answer, and the data of the final SSE event."""

    id: str = Field(description="Request id; pass it to /v1/feedback.")
    ensemble: str = Field(description="Ensemble that answered.")
    policy: str = Field(description="Policy that chose the writers.")
    text: str = Field(description="The whole response.")
    segments: list[Segment] = Field(description="The response, split by the model that wrote it.")
    finish_reason: str = Field(
        description="'eos', 'stop' (stop string), 'length' (budget) or 'policy' (policy ended it)."
    )
    usage: Usage = Field(description="Token counts.")


class SegmentEventBody(Segment):
    """Data of one `event: segment` of a streamed `/v1/generate` answer."""

    id: str = Field(description="Request id.")


class FeedbackRequest(_Strict):
    """Body of `POST /v1/feedback`: a reward for a finished request."""

    request_id: str = Field(min_length=1, description="The `id` of the answer being rated.")
    reward: float = Field(description="The reward; any finite number, larger is better.")

    @field_validator("reward")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("reward must be a finite number")
        return v


class FeedbackResponse(BaseModel):
    """Answer of `POST /v1/feedback`."""

    request_id: str = Field(description="The rated request.")
    recorded: bool = Field(description="True once the reward is in the turn log.")


# --- OpenAI-compatible API -------------------------------------------------------------------


# OpenAI parameters antiphon does not implement (yet), each with the values that ask for
# nothing, which are accepted: any other value is a 400 naming the parameter, never ignored.
NOT_IMPLEMENTED: dict[str, tuple[object, ...]] = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "moderation": (None,),  # may block the input or the answer
}
# The OpenAI parameters about the account, its storage or caching, not the answer, are taken
# with no effect, as every other unknown key (`_Lenient`); a reasoning model's knobs too.
ACCOUNT_ONLY = (
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "reasoning_effort",
    "verbosity", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "safety_identifier",
)  # fmt: skip


def _asks_nothing(value: object, off: tuple[object, ...]) -> bool:
    """`value` is one of `off`, of the same type (so 0 is not False, nor True 1)."""
    return any(value == v and type(value) is type(v) for v in off)


class StreamOptions(BaseModel):
    """`stream_options` of a streamed request."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        default=False,
        description="Send one more chunk before [DONE]: `choices: []` and the usage.",
    )
    include_obfuscation: bool | None = Field(
        default=None, description="Accepted, no effect (antiphon pads nothing)."
    )


class _OpenAIFields(SamplingFields, _Lenient):
    model: str = Field(description="Ensemble name (see GET /v1/models).")
    stream: bool = Field(default=False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(
        default=None, description="Streaming options (include_usage)."
    )
    n: int = Field(
        default=1, ge=1, le=MAX_CHOICES,
        description="Independent samples per prompt (choice k > 0 seeded from seed and k).",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _nothing_ignored(cls, data: object) -> object:
        """A parameter of the OpenAI API that antiphon does not implement is refused with a
        400 naming it, unless its value asks for nothing."""
        if isinstance(data, dict):
            for name, off in NOT_IMPLEMENTED.items():
                if name in data and not _asks_nothing(data[name], off):
                    accepted = " or ".join(repr(v) for v in off if v is not None)
                    raise ValueError(
                        f"{name}: not supported by antiphon (got {data[name]!r}); leave it "
                        f"out{f' or send {accepted}' if accepted else ''}"
                    )
        return data

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_OpenAIFields):
    """Body of `POST /v1/completions` (OpenAI); extra: policy, policy_params, top_k."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="The prompt, or a list of prompts (a batch: n choices for each); a prompt "
        "may be token ids of the ensemble's first model (decoded, special tokens dropped: "
        "every model adds its own)."
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS,
        description="Each chosen token's log-prob under its writer, and this many of the "
        "writer's most likely tokens at each position.",
    )  # fmt: skip
    echo: bool = Field(
        default=False,
        description="Answer with the prompt before the completion; with logprobs, the "
        "prompt's under the ensemble's first model or `echo_model` (the first token's null).",
    )
    echo_model: str | None = Field(
        default=None,
        description="The model of the ensemble whose log-probs score an echoed prompt "
        "(default: the first).",
    )
    max_tokens: int | None = Field(
        default=None, ge=0,
        description="Token budget of each completion; 0 (with echo): only the prompt, scored.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _echo_as_the_api_has_it(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 asks for no completion; only with echo=true")
        if self.echo and self.stream:
            raise ValueError("echo: not supported by antiphon with stream=true")
        if self.echo_model is not None and not self.echo:
            raise ValueError("echo_model: names the model that scores an echo; only with echo")
        return self

    @model_validator(mode="after")
    def _choices_bounded(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: a list prompt must hold at least one string or token id")
        if any(not p for p in self.prompts()):
            raise ValueError("prompt: a token-id prompt must hold at least one token id")
        choices = len(self.prompts()) * self.n
        if choices > MAX_CHOICES:
            raise ValueError(
                f"prompt: {len(self.prompts())} prompts x n={self.n} is {choices} choices; "
                f"at most {MAX_CHOICES} per request"
            )
        return self

    def alternatives(self) -> int:
        return self.logprobs or 0

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch (one for a plain string or one list of token ids)."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


class ChatCompletionRequest(_OpenAIFields):
    """Body of `POST /v1/chat/completions` (OpenAI); extra: policy, policy_params, top_k."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Newer name of max_tokens; wins if both are given."
    )
    logprobs: bool | None = Field(
        default=None, description="Each chosen token's log-prob under the model that wrote it."
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20,
        description="With logprobs: this many of the writer's most likely tokens per position.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _top_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self

    def alternatives(self) -> int:
        return self.top_logprobs or 0


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position, under the model that wrote there."""

    token: str = Field(description="The token's text.")
    logprob: float = Field(description="Its log-probability.")
    bytes: list[int] = Field(description="The UTF-8 bytes of `token`.")


class TokenLogprob(BaseModel):
    """One chosen token of a chat answer and its log-prob under the model that wrote it."""

    token: str = Field(description="The token's text.")
    logprob: float = Field(description="Its log-probability under its writer's sampling.")
    bytes: list[int] = Field(description="The UTF-8 bytes of `token`.")
    top_logprobs: list[TopLogprob] = Field(
        default_factory=list,
        description="With top_logprobs asked: the writer's most likely tokens here, best first.",
    )
    antiphon_model: str = Field(description="The model that wrote the token.")


class ChatLogprobs(BaseModel):
    """`logprobs` of a chat choice (or of a streamed chunk of it)."""

    content: list[TokenLogprob] = Field(description="The chosen tokens, in order.")
    refusal: None = Field(default=None, description="Always null.")


class CompletionLogprobs(BaseModel):
    """`logprobs` of a completion choice (or of a streamed chunk of it), legacy layout."""

    tokens: list[str] = Field(description="The chosen tokens' texts.")
    token_logprobs: list[float | None] = Field(
        description="Their log-probs under their writers (an echoed prompt's first: null)."
    )
    top_logprobs: list[dict[str, float] | None] | None = Field(
        default=None,
        description="With logprobs >= 1: per token, its writer's most likely tokens (text -> "
        "log-prob; an echoed prompt's first: null).",
    )
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")
    antiphon_models: list[str] = Field(description="The model that wrote each token.")


CHOICE_INDEX = "Choice k = prompt index x n + sample index; logged as request id-k (k > 0)."
SEGMENTS = "Who wrote what: the choice's segments (of this chunk when streaming)."
LOGPROBS = "With `logprobs` asked: its tokens' log-probs, each under the model that wrote it."


class CompletionChoice(BaseModel):
    """One choice of a text completion (or of a streamed chunk)."""

    index: int = Field(default=0, description=CHOICE_INDEX)
    text: str = Field(description="Completion text (of this chunk when streaming).")
    finish_reason: Literal["stop", "length"] | None = Field(
        default=None, description="Why it ended; null in chunks before the last."
    )
    logprobs: CompletionLogprobs | None = Field(default=None, description=LOGPROBS)
    antiphon_segments: list[Segment] = Field(default_factory=list, description=SEGMENTS)


class ChatMessageOut(BaseModel):
    """The assistant message of a chat completion, or a streamed delta of it."""

    role: Literal["assistant"] | None = Field(default=None, description="'assistant'.")
    content: str | None = Field(default=None, description="Text (of this chunk when streaming).")


class ChatChoice(BaseModel):
    """The one choice of a chat completion."""

    index: int = Field(default=0, description=CHOICE_INDEX)
    message: ChatMessageOut = Field(description="The assistant's answer.")
    finish_reason: Literal["stop", "length"] = Field(description="Why it ended.")
    logprobs: ChatLogprobs | None = Field(default=None, description=LOGPROBS)
    antiphon_segments: list[Segment] = Field(default_factory=list, description=SEGMENTS)


class ChatChunkChoice(BaseModel):
    """The one choice of a streamed chat completion chunk."""

    index: int = Field(default=0, description=CHOICE_INDEX)
    delta: ChatMessageOut = Field(description="The new piece of the answer.")
    finish_reason: Literal["stop", "length"] | None = Field(
        default=None, description="Why it ended; null in chunks before the last."
    )
    logprobs: ChatLogprobs | None = Field(default=None, description=LOGPROBS)
    antiphon_segments: list[Segment] = Field(default_factory=list, description=SEGMENTS)


class OpenAIResponse(BaseModel):
    """A completion, chat completion, or one streamed chunk of either."""

    id: str = Field(description="Request id; pass it to /v1/feedback.")
    object: Literal["text_completion", "chat.completion", "chat.completion.chunk"] = Field(
        description="OpenAI object type."
    )
    created: int = Field(description="Unix time the request started.")
    model: str = Field(description="The ensemble that answered.")
    choices: list[CompletionChoice] | list[ChatChoice] | list[ChatChunkChoice] = Field(
        description="The choices (a streamed chunk: the one it extends; a usage chunk: none)."
    )
    usage: Usage | None = Field(
        default=None,
        description="Token counts; streamed, only in the extra chunk `stream_options."
        "include_usage` asks for (its `choices` empty).",
    )


class ModelCard(BaseModel):
    """One entry of GET /v1/models: an ensemble."""

    id: str = Field(description="Ensemble name; use it as `model`.")
    object: Literal["model"] = Field(default="model", description="OpenAI object type.")
    created: int = Field(description="Unix time the server started.")
    owned_by: str = Field(default="antiphon", description="Always 'antiphon'.")
    antiphon_models: list[str] = Field(description="Models of the ensemble.")
    antiphon_policy: str = Field(description="Default policy of the ensemble.")
    antiphon_policy_params: dict[str, PolicyParamValue] = Field(
        default_factory=dict,
        description="Parameters of the default policy a request may set (those only the "
        "config sets, paths and deployments, left out); a request's are merged over them.",
    )
    antiphon_policies: list[str] = Field(
        default_factory=list,
        description="Policies a request to this ensemble may name (its own first).",
    )
    description: str = Field(default="", description="Ensemble description from the config.")
    antiphon_gates: dict[str, str] = Field(
        default_factory=dict,
        description="Model -> fingerprint of its deferral gate, for the models that carry one "
        "(turn records name the gate by the same fingerprint).",
    )


class ModelList(BaseModel):
    """Body of GET /v1/models."""

    object: Literal["list"] = Field(default="list", description="OpenAI object type.")
    data: list[ModelCard] = Field(description="The configured ensembles.")


# --- errors ----------------------------------------------------------------------------------


class HealthBody(BaseModel):
    """`GET /health`: "ok", or "degraded" with what is degraded (the server still answers)."""

    status: Literal["ok", "degraded"] = Field(description="'ok' or 'degraded'.")
    degraded: dict[str, str] = Field(
        default_factory=dict, description="Component -> what is wrong with it (e.g. turn_log)."
    )


class ErrorDetail(BaseModel):
    """What went wrong, OpenAI style."""

    message: str = Field(description="Human-readable explanation naming the problem.")
    type: str = Field(description="Category: invalid_request_error, not_found_error, ...")
    param: str | None = Field(default=None, description="The offending field, if one is.")
    code: str | None = Field(default=None, description="antiphon error class, e.g. PromptTooLong.")


class ErrorBody(BaseModel):
    """Body of every 4xx/5xx answer: {"error": {...}}."""

    error: ErrorDetail = Field(description="The error.")
