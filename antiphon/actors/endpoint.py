"""`CompletionsModel`: a model behind any OpenAI-compatible completions endpoint, as a
`SessionModel`, so a black-box large model can be a member of an ensemble (the proposer of a
weak-to-strong search, or a writer taking turns).

    endpoint = {"base_url": "http://big-host:8000/v1", "model": "strong"}
    model = CompletionsModel(ModelSpec(name="big", path="zoo:strong", endpoint=endpoint))
    g = await model.generate(None, SamplingParams(max_new_tokens=16, seed=1), prompt_ids)
    model.tokens_sampled                      # completion tokens the endpoint reports using

It is text in, text out. A session is held here, as token ids in the local tokenizer the
spec's `path` names (budgets and the context count in it); each `generate` is one POST to
`{base_url}/completions` with the session's text as the prompt (decoded, special tokens
skipped) and the sampling parameters passed through (max_tokens, temperature, top_p, seed,
stop; top_k only when set, in the body's extras, as vLLM and antiphon take it), and what
comes back is re-encoded. Its tokenizer fingerprint is the endpoint's, never the local
tokenizer's, so every other model re-tokenizes its text rather than trust its ids.

What the endpoint's answer becomes:

- finish "length" -> "length"; "stop" -> "stop" when a stop string cut the text (as the
  endpoint's `stop_reason` or `matched_stop` says; an endpoint that says neither: whenever
  stop strings were given, since ending the response there is the safe reading), else "eos",
  and then the local end token closes the ids, as an engine returns the end token it wrote.
  A stop string is not in the text nor the session (the endpoint cuts it off).
- log-probs (asked as `logprobs: 0`): each endpoint token's goes to the local token its text
  ends in, so a stretch whose ends both tokenizers share keeps its log p exactly (every token,
  for the same tokenizer); pieces that do not spell the text: their sum spread evenly. An
  endpoint that gives none (or a spec with `logprobs: false`): 0.0 per token, which means
  unknown, not certain (JSON turn records take no NaN).
- a text that re-encodes to more tokens than were asked for is cut to them ("length").

There are no log-probs to score with: `score`, `teacher_force` and the next-token reads raise
`InvalidRequest` (a black box can write or propose, not score or carry a gate). Errors: the
endpoint's 4xx -> `InvalidRequest` quoting its message; 429 and 503 -> asked again with
backoff (a busy endpoint must not cost a request), then `Overloaded`; a refused connection,
a timeout (`timeout_s`, so no call hangs) or a 5xx -> `Unreachable`. Messages name the model,
never the endpoint's address (they reach API clients); the log has it.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import openai

from antiphon.checkpoint import checkpoint_context, load_tokenizer
from antiphon.config import EndpointSpec, ModelSpec
from antiphon.errors import (
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    SessionLost,
    Unreachable,
    retry_overloaded,
)
from antiphon.logging import get_logger
from antiphon.messages import (
    FinishReason,
    Generation,
    ModelInfo,
    SamplingParams,
    SessionInfo,
    TeacherForced,
    as_token_ids,
)

log = get_logger(__name__)

# The client would otherwise read OPENAI_API_KEY: a key meant for one service must never be
# sent to an endpoint the config did not give it to. Keyless endpoints ignore this one.
NO_KEY = "none"


@dataclass
class _Session:
    ids: list[int]
    # calls of one session run in the order they came, as on an engine (an append must not
    # land in the middle of a generate's round trip)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class _Completion:
    """One endpoint answer, as read: its text, finish reason and the tokens it billed."""

    text: str
    finish_reason: str | None
    stop_matched: bool | None  # a stop string cut the text; None: the endpoint did not say
    pieces: list[tuple[str, float]] | None  # (token text, log-prob), if it gave them
    completion_tokens: int | None
    prompt_tokens: int | None


class CompletionsModel:
    """One model behind a completions endpoint; its sessions kept here, client-side."""

    def __init__(self, spec: ModelSpec, tokenizer: Any = None) -> None:
        if spec.endpoint is None:
            raise InvalidRequest(f"model {spec.name!r} has no endpoint to reach it by")
        self.spec, self.endpoint = spec, spec.endpoint
        self.tokenizer = tokenizer or load_tokenizer(spec.path, spec.trust_remote_code)
        self.max_context = _max_context(spec)
        eos = self.tokenizer.eos_token_id
        self.eos_id: int | None = eos if isinstance(eos, int) else None
        self.client = openai.AsyncOpenAI(
            base_url=self.endpoint.base_url,
            api_key=_api_key(spec),
            timeout=self.endpoint.timeout_s,
            # one try per call: Overloaded is retried below, and every other failure must
            # surface within timeout_s, not after the client's own rounds of retries
            max_retries=0,
        )
        self.sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self.tokens_sampled = 0  # completion tokens the endpoint reported (its usage)
        self.tokens_prompted = 0  # prompt tokens it reported reading

    async def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.spec.name,
            vocab_size=len(self.tokenizer),
            max_context=self.max_context,
            eos_token_ids=() if self.eos_id is None else (self.eos_id,),
            tokenizer_fingerprint=endpoint_fingerprint(self.endpoint),
            device="endpoint",
            dtype="unknown",
        )

    async def shutdown(self) -> None:
        """Close the HTTP client's connections."""
        await self.client.close()

    # -- sessions ---------------------------------------------------------------------------

    def _session(self, session_id: str) -> _Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionLost(
                f"unknown session {session_id!r} on model {self.spec.name!r} (never opened, "
                f"closed, or evicted: at most {self.spec.max_sessions} are kept)"
            )
        self.sessions.move_to_end(session_id)
        return session

    def _new(self, ids: list[int]) -> str:
        if not ids:
            raise InvalidRequest("prompt is empty: a session needs at least one token")
        self._make_room()
        session_id = f"{self.spec.name}-endpoint-{uuid4().hex}"
        self.sessions[session_id] = _Session(ids)
        return session_id

    def _make_room(self) -> None:
        """Forget the least recently used idle session while the table is full."""
        while len(self.sessions) >= self.spec.max_sessions:
            idle = next((s for s, v in self.sessions.items() if not v.lock.locked()), None)
            if idle is None:
                raise Overloaded(
                    f"model {self.spec.name!r} holds {len(self.sessions)} sessions, all busy"
                )
            del self.sessions[idle]

    def _ids(self, token_ids: object, what: str = "token_ids") -> list[int]:
        return as_token_ids(token_ids, len(self.tokenizer), what)

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt)["input_ids"])  # special tokens, as an engine
        else:
            ids = self._ids(prompt, "prompt")
        return SessionInfo(self._new(ids), len(ids))

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        ids = self._ids(token_ids)
        session = self._session(session_id)
        async with session.lock:
            session.ids += ids
            return SessionInfo(session_id, len(session.ids))

    async def fork(self, session_id: str, n: int, length: int | None = None) -> list[str]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"fork n must be an integer >= 1, got {n!r}")
        session = self._session(session_id)
        async with session.lock:
            length = len(session.ids) if length is None else length
            _check_length(session_id, length, len(session.ids), "fork")
            return [self._new(session.ids[:length]) for _ in range(n)]

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        session = self._session(session_id)
        async with session.lock:
            _check_length(session_id, length, len(session.ids), "truncate")
            del session.ids[length:]
            return SessionInfo(session_id, length)

    async def close(self, session_id: str) -> None:
        # at once, even under a generate in flight: a closed request wants nothing back
        self.sessions.pop(session_id, None)

    # -- writing ----------------------------------------------------------------------------

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
        self._check_supported(params)
        prefix = self._ids(prefix_ids, "prefix_ids")
        if session_id is None:
            if not prefix:
                raise InvalidRequest("generate without a session needs prefix_ids: its prompt")
            session_id, prefix = self._new(prefix), []
        session = self._session(session_id)
        async with session.lock:
            session.ids += prefix
            return await self._write(session_id, session, params)

    async def _write(
        self, session_id: str, session: _Session, params: SamplingParams
    ) -> Generation:
        room = self.max_context - len(session.ids)
        if room <= 0:
            raise PromptTooLong(
                f"session {session_id!r} holds {len(session.ids)} tokens, the whole context "
                f"of model {self.spec.name!r} ({self.max_context}): no room to write"
            )
        limit = min(params.max_new_tokens, room)
        prompt = self.tokenizer.decode(session.ids, skip_special_tokens=True)
        done = await retry_overloaded(lambda: self._complete(prompt, params, limit))
        self.tokens_prompted += done.prompt_tokens or 0
        # usage is optional in the API; without it the tokens it wrote are the best count
        ids, ends = self._encode(done.text)
        self.tokens_sampled += done.completion_tokens or len(ids)
        finish = _finish(done, params)
        eos = finish == "eos" and self.eos_id is not None
        logprobs = local_logprobs(done.pieces, done.text, ends, eos)
        text = done.text
        if len(ids) + eos > limit:  # its tokens are coarser than ours: keep what was asked
            ids, text, logprobs = ids[:limit], text[: ends[limit - 1]], logprobs[:limit]
            finish, eos = "length", False
        if eos:
            ids.append(self.eos_id)  # as an engine returns the end token it wrote
        session.ids += ids
        return Generation(
            session_id=session_id,
            token_ids=tuple(ids),
            text=text,
            logprobs=tuple(logprobs),
            finish_reason=finish,
            length=len(session.ids),
        )

    def _check_supported(self, params: SamplingParams) -> None:
        """What a completions endpoint cannot do is refused, never silently dropped."""
        refused = {
            "gate_threshold": params.gate_threshold is not None,  # it carries no gate
            "logprobs_top_k": params.logprobs_top_k > 0,  # alternatives in another vocabulary
            "stop_token_ids": bool(params.stop_token_ids),  # ids of our tokenizer, not its
            "ignore_eos": params.ignore_eos,  # not in the OpenAI API
            # ids of our tokenizer; penalties and a grammar over the response, which it
            # would read as part of the prompt
            "logit_bias": bool(params.logit_bias),
            "presence_penalty": params.presence_penalty != 0,
            "frequency_penalty": params.frequency_penalty != 0,
            "response_format": params.grammar is not None,
        }
        asked = [name for name, on in refused.items() if on]
        if asked:
            raise InvalidRequest(
                f"model {self.spec.name!r} is behind a completions endpoint, which takes no "
                f"{', '.join(asked)}"
            )

    def _encode(self, text: str) -> tuple[list[int], list[int]]:
        """The text's ids in the local tokenizer, and where (in characters) each one ends."""
        try:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, ends = list(enc["input_ids"]), [end for _, end in enc["offset_mapping"]]
        except NotImplementedError:  # a slow tokenizer: no offsets; the decoded prefixes tell
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            ends = [len(self.tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
        for i in range(1, len(ends)):  # special tokens report (0, 0): keep the ends in order
            ends[i] = max(ends[i], ends[i - 1])
        return ids, ends

    async def _complete(self, prompt: str, params: SamplingParams, limit: int) -> _Completion:
        """One completion request; the endpoint's failures as antiphon's errors."""
        body: dict[str, Any] = {
            "model": self.endpoint.model,
            "prompt": prompt,
            "max_tokens": limit,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop_strings:
            body["stop"] = list(params.stop_strings)
        if self.endpoint.logprobs:
            body["logprobs"] = 0  # the chosen tokens' only: what a Segment keeps
        if params.top_k:
            body["extra_body"] = {"top_k": params.top_k}
        try:
            response = await self.client.completions.create(**body)
        except openai.APIStatusError as e:
            raise self._status_error(e) from None
        except openai.APITimeoutError:
            raise self._unreachable(
                f"did not answer within {self.endpoint.timeout_s:g} s (endpoint.timeout_s)"
            ) from None
        except openai.APIConnectionError as e:
            raise self._unreachable(f"cannot be reached ({e.__cause__ or e})") from None
        if not response.choices:
            raise self._unreachable("answered without a choice")
        return _read(response)

    def _where(self) -> str:
        return f"model {self.spec.name!r} (endpoint model {self.endpoint.model!r})"

    def _status_error(self, e: openai.APIStatusError) -> Exception:
        said = f"the endpoint answered {e.status_code}: {_message(e)}"
        if e.status_code in (429, 503):
            return Overloaded(f"{self._where()}: {said}")
        if 400 <= e.status_code < 500:
            if e.status_code in (401, 403):
                said += " (check the key endpoint.api_key_env names)"
            return InvalidRequest(f"{self._where()}: {said}")
        return self._unreachable(f"failed: {said}")

    def _unreachable(self, what: str) -> Unreachable:
        log.warning("endpoint_unreachable", model=self.spec.name, base_url=self.endpoint.base_url,
                    problem=what)  # fmt: skip
        return Unreachable(f"{self._where()}: its completions endpoint {what}")

    # -- no scoring -------------------------------------------------------------------------

    def _no_logprobs(self, what: str) -> InvalidRequest:
        return InvalidRequest(
            f"model {self.spec.name!r} is a black box behind a completions endpoint: it gives "
            f"no log-probs to {what}; use it to write or to propose (a search's proposer), "
            "not to score or to carry a gate"
        )

    async def score(self, session_id: str, token_ids: list[int], keep: bool = False) -> list[float]:
        raise self._no_logprobs("score tokens with")

    async def teacher_force(
        self, session_id: str, token_ids: list[int], top_k: int = 0
    ) -> TeacherForced:
        raise self._no_logprobs("teacher-force with")

    async def next_token_logprobs(self, session_id: str, candidate_ids: list[int]) -> list[float]:
        raise self._no_logprobs("rank next tokens with")

    async def prompt_next_token_logprobs(
        self, prompt: list[int] | str, candidate_ids: list[int]
    ) -> list[float]:
        raise self._no_logprobs("rank next tokens with")


def endpoint_fingerprint(endpoint: EndpointSpec) -> str:
    """The tokenizer fingerprint of a model behind an endpoint: its address and model id,
    never a local tokenizer's, so no other model takes its ids as its own."""
    where = f"{endpoint.base_url}|{endpoint.model}"
    return "endpoint:" + hashlib.sha256(where.encode()).hexdigest()[:16]


def _api_key(spec: ModelSpec) -> str:
    name = spec.endpoint.api_key_env if spec.endpoint else None
    if name is None:
        return NO_KEY
    key = os.environ.get(name)
    if not key:
        raise InvalidRequest(
            f"model {spec.name!r}: the environment variable {name} (endpoint.api_key_env) is "
            "not set where the coordinator runs"
        )
    return key


def _max_context(spec: ModelSpec) -> int:
    assert spec.endpoint is not None
    if spec.endpoint.max_context is not None:
        return spec.endpoint.max_context
    context = checkpoint_context(spec.path, spec.trust_remote_code)
    if context is None:
        raise InvalidRequest(
            f"model {spec.name!r}: {spec.path!r} holds no model config to read the context "
            "from; set endpoint.max_context"
        )
    return context


def _check_length(session_id: str, length: object, held: int, what: str) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= held:
        raise InvalidRequest(
            f"cannot {what} session {session_id!r} at {length!r} tokens: it has {held}"
        )


def _read(response: Any) -> _Completion:
    choice = response.choices[0]
    extra = choice.model_extra or {}
    # vLLM says which stop ended the text (`stop_reason`: the string, or a token id), SGLang
    # `matched_stop`; the OpenAI API itself does not
    stop_matched = None
    for key in ("stop_reason", "matched_stop"):
        if key in extra:
            stop_matched = isinstance(extra[key], str)
    pieces = None
    lp = choice.logprobs
    if lp is not None and lp.tokens is not None and lp.token_logprobs is not None:
        pieces = [
            (t or "", float(x))
            for t, x in zip(lp.tokens, lp.token_logprobs, strict=False)
            if x is not None and math.isfinite(x)
        ]
    usage = response.usage
    return _Completion(
        text=choice.text or "",
        finish_reason=choice.finish_reason,
        stop_matched=stop_matched,
        pieces=pieces,
        completion_tokens=usage.completion_tokens if usage else None,
        prompt_tokens=usage.prompt_tokens if usage else None,
    )


def _finish(done: _Completion, params: SamplingParams) -> FinishReason:
    """The endpoint's "stop" covers both its end token and a stop string (which it cut off)."""
    if done.finish_reason == "length":
        return "length"
    if params.stop_strings and done.stop_matched is not False:
        return "stop"
    return "eos"  # "stop" without a stop string, or another reason that ended it (a filter)


def local_logprobs(
    pieces: list[tuple[str, float]] | None, text: str, ends: list[int], eos: bool
) -> list[float]:
    """One log-prob per local token (and the end token, with `eos`) from the endpoint's
    (piece, log-prob) pairs: each piece's to the local token its text ends in; an empty piece
    after the text (the endpoint's end token) to ours. 0.0 each where none were given."""
    n = len(ends) + eos
    if not pieces or n == 0:
        return [0.0] * n
    if "".join(p for p, _ in pieces) != text:  # byte pieces, or a cut: keep the text's log p
        total = sum(x for _, x in pieces)
        return [total / n] * n if n else []
    out = [0.0] * n
    pos, i = 0, 0
    for piece, logprob in pieces:
        pos += len(piece)
        if (not piece and pos == len(text) and eos) or not ends:
            out[-1] += logprob
            continue
        while i < len(ends) - 1 and ends[i] < pos:
            i += 1
        out[i] += logprob
    return out


def _message(e: openai.APIStatusError) -> str:
    """The endpoint's own words: the OpenAI error body's message, else the client's summary."""
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return e.message
