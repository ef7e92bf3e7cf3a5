"""The HTTP ingress: a Serve deployment whose FastAPI app turns API bodies into coordinator
requests and coordinator results into API bodies.

Routes (bodies in `antiphon.deploy.api`):
    GET  /                       the playground (playground.html): a page that calls the API
                                 below with the key typed into it; open without the key, as
                                 it holds no data
    GET  /health                 liveness (always 200) and what is degraded behind it; open
                                 without the API key (a probe has none)
    GET  /v1/models              the configured ensembles, OpenAI style
    GET  /v1/models/{id}         one of them
    POST /v1/generate            native API: text + segments; SSE with "stream": true
    POST /v1/completions         OpenAI completions (stream or not)
    POST /v1/chat/completions    OpenAI chat completions (stream or not)
    POST /v1/feedback            a reward for a request id -> the turn log (404 for an id
                                 the log does not hold)

Every error answer is `{"error": {"message", "type", "param", "code"}}`. Client mistakes get
4xx (antiphon errors by their `http_status`; malformed JSON, invalid fields and text that is
not valid Unicode 400; a body over `serving.max_body_bytes` 413 before it is parsed), too
many requests in flight 503, a missing or wrong API key 401. Anything else is a 500 that
names a reference into the server's log and nothing of the internals. A request's
`policy_params` may not set what only the config may (paths, hub ids, deployments, patterns:
`PolicyParams.config_only`). A streamed answer checks its request
before the first byte is sent (the first event is awaited first), so a bad request still gets
its 4xx; a failure after that arrives as a last `error` event. A coordinator replica that
dies mid-request costs a second run on the replica Serve starts instead; a stream is resumed
after the segments it had sent.

Every answer is counted and timed (`antiphon_requests`, `antiphon_request_errors` by error
kind and status, `antiphon_request_latency_seconds`, and for a stream
`antiphon_time_to_first_segment_seconds`; `antiphon.deploy.http_metrics`, the outermost
middleware), exported by Ray's metrics agent on each node's metrics export port.

The FastAPI app is built per replica by `create_api(backend, config)` from any `Backend`; the
`Ingress` deployment is the backend that calls the coordinator through its Serve handle.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import importlib.resources
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from antiphon.checkpoint import load_tokenizer
from antiphon.coordinator.request import (
    FinishEvent,
    GenerationRequest,
    GenerationResult,
    SegmentEvent,
    StreamEvent,
    Usage,
    openai_finish_reason,
)
from antiphon.coordinator.scoring import ScoredPrompt
from antiphon.deploy import api
from antiphon.deploy.chat import render_chat
from antiphon.deploy.choices import all_or_none, choice_request_id, choice_seed, merged
from antiphon.deploy.config import AppConfig, EnsembleSpec
from antiphon.deploy.http_metrics import (
    RecordHttpMetrics,
    note_ensemble,
    note_error,
    note_first_segment,
    route_templates,
)
from antiphon.deploy.logprobs import (
    WrittenToken,
    chat_logprobs,
    completion_logprobs,
    prompt_tokens,
    written_tokens,
)
from antiphon.errors import (
    AntiphonError,
    InvalidRequest,
    Overloaded,
    Unauthorized,
    antiphon_cause,
    unwrapped,
)
from antiphon.logging import configure_logging, get_logger, log_context
from antiphon.policies.registry import check_request_params, nameable_policies, request_params
from antiphon.sequence import Segment

log = get_logger(__name__)

SHEDDING_HEADROOM = 1024  # requests past the slot limit that still reach the app to be refused
HEALTH_TIMEOUT_S = 3.0  # a probe waits this long for the coordinator's own check
RETRY_AFTER_S = 1  # a slot frees when any request in flight ends: seconds, not minutes
COORDINATOR_ATTEMPTS = 2  # a request whose coordinator replica died runs once more

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    503: "overloaded_error",
}


# --- what the app needs from behind it --------------------------------------------------------


class Backend(Protocol):
    """What the HTTP app calls: the coordinator (and the tokenizers, for chat)."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The whole answer."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Segment events in order, then one FinishEvent."""
        ...

    async def feedback(self, request_id: str, reward: float) -> None:
        """Log a reward for a request beside its turns."""
        ...

    async def health(self) -> dict[str, str]:
        """What behind the app is degraded, by component; {} when nothing is."""
        ...

    async def render_chat(self, ensemble: EnsembleSpec, messages: Sequence[api.ChatMessage]) -> str:
        """Prompt text of a conversation, in the ensemble's chat format."""
        ...

    async def decode(self, model: str, token_ids: Sequence[int]) -> str:
        """Token ids of `model` as text, special tokens dropped (InvalidRequest naming an id
        outside its vocabulary)."""
        ...

    async def token_texts(self, model: str, token_ids: Sequence[int]) -> list[str]:
        """Each token's text in `model`'s tokenizer ("" for special tokens)."""
        ...

    async def gates(self) -> dict[str, str]:
        """Model -> the fingerprint of its deferral gate, for the models that carry one."""
        ...

    async def prompt_logprobs(self, model: str, prompt: str, top_k: int = 0) -> ScoredPrompt:
        """The prompt's token ids in `model`'s tokenizer, each one's log-prob given those
        before it (None for the first) and, top_k asked, the most likely tokens there."""
        ...


class RequestSlots:
    """At most `limit` generation requests in flight on this replica; beyond: Overloaded.
    A request of several choices takes a slot for each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self, count: int = 1) -> None:
        if count > self.limit:
            raise InvalidRequest(
                f"{count} choices in one request, but the server runs at most {self.limit} "
                "at once (serving.max_concurrent_requests): ask for fewer"
            )
        refusal = self.overloaded(count)
        if refusal is not None:
            raise refusal
        self.in_flight += count

    def release(self, count: int = 1) -> None:
        self.in_flight -= count

    def overloaded(self, count: int = 1) -> Overloaded | None:
        """The refusal `count` more requests would get now, or None while slots are free."""
        if self.in_flight + count <= self.limit:
            return None
        return Overloaded(
            f"server busy: {self.in_flight} requests in flight (limit {self.limit}); retry"
        )


LIVENESS_PATH = "/health"  # open without the API key: a probe has no key
PLAYGROUND_PATH = "/"  # open without the API key: the page holds no data, its calls send the key
# "": the app's root without its slash, which the router redirects to the playground's path
OPEN_PATHS = frozenset({LIVENESS_PATH, PLAYGROUND_PATH, ""})


class RequireApiKey:
    """ASGI middleware: with an API key set, every route but the liveness probe and the
    playground page (the API, its docs and schema alike) needs 'Authorization: Bearer <key>',
    checked before a byte of the body is read."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _route_path(scope) not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = Unauthorized("missing or wrong API key; send 'Authorization: Bearer <key>'")
                await _antiphon_error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path inside the app: Serve mounts it under its route prefix (the root path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


GENERATION_PATHS = frozenset({"/v1/generate", "/v1/completions", "/v1/chat/completions"})


class RefuseWhenFull:
    """ASGI middleware: while every slot is taken, a generation request gets its 503 before
    its body is read or parsed: past capacity the refusal is what must be fast. (A request
    let through still takes its slot in the route, which refuses it if the last one went
    meanwhile.)"""

    def __init__(self, app: ASGIApp, slots: RequestSlots) -> None:
        self.app = app
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _route_path(scope) in GENERATION_PATHS:
            refusal = self.slots.overloaded()
            if refusal is not None:
                await _antiphon_error(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before it is parsed, at
    once when its Content-Length says so, else when the bytes received pass the limit.

    Not FastAPI's `max_body_size`: that answers a declared length in plain text, over the
    one error body every other answer of this API has."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await error_response(413, body_too_large(self.limit))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # FastAPI passes an HTTPException on to our handler
                raise StarletteHTTPException(413, detail=body_too_large(self.limit))
            return message

        await self.app(scope, counted, send)


def body_too_large(limit: int) -> str:
    return f"request body too large: the limit is {limit} bytes (serving.max_body_bytes)"


# --- errors -----------------------------------------------------------------------------------


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = api.ErrorBody(
        error=api.ErrorDetail(
            message=message,
            type=_ERROR_TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            param=param,
            code=code,
        )
    )
    # A 503 is load shedding: say when to come back (the openai client waits that long).
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    note_error(status, code)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def internal_error_message(exc: BaseException) -> str:
    """What a client is told of a failure that is not its mistake: a reference to the server's
    log, where the traceback goes. Never the exception's text: a Ray error carries the
    remote traceback, process ids, node addresses and file paths."""
    reference = uuid.uuid4().hex[:12]
    log.error("internal_error", reference=reference, error=repr(exc), exc_info=exc)
    return f"internal error (reference {reference}; the server's log has the details)"


def _antiphon_error(exc: AntiphonError) -> JSONResponse:
    return error_response(exc.http_status, exc.message, code=type(exc).__name__)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    problems, params = [], []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            problems.append(f"malformed JSON body: {ctx.get('error', err.get('msg'))}")
            continue
        field = ".".join(loc)
        if not field and err.get("type") == "model_attributes_type":
            problems.append(
                "the request body must be a JSON object (send Content-Type: application/json)"
            )
            continue
        params.append(field)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{field}: {msg}" if field else msg)
    return error_response(
        400, "; ".join(problems) or "invalid request", code="InvalidRequest",
        param=params[0] if params and params[0] else None,
    )  # fmt: skip


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the one error body; client mistakes never become a 500."""

    async def on_antiphon_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AntiphonError)
        return _antiphon_error(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _validation_error(exc)

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, internal_error_message(exc))

    app.add_exception_handler(AntiphonError, on_antiphon_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


# --- API bodies -> coordinator requests ---------------------------------------------------------


def coordinator_request(
    fields: api.SamplingFields,
    prompt: str,
    ensemble: EnsembleSpec,
    config: AppConfig,
    max_tokens: int | None = None,
    top_logprobs: int = 0,
) -> GenerationRequest:
    """The coordinator request for an API body. The policy is the ensemble's unless the body
    names another; parameters given for the ensemble's own policy are merged over its defaults.
    `top_logprobs`: alternatives per token to return (OpenAI bodies name it differently)."""
    own_policy = fields.policy is None or fields.policy == ensemble.policy.name
    policy = ensemble.policy.name if own_policy else fields.policy
    check_request_params(policy, fields.policy_params or {}, own_policy)
    if own_policy:
        params = {**ensemble.policy.params, **(fields.policy_params or {})}
    else:
        params = dict(fields.policy_params or {})
    return GenerationRequest.parse(
        {
            "request_id": uuid.uuid4().hex,
            "prompt": prompt,
            "models": tuple(ensemble.models),
            "policy": policy,
            "policy_params": params,
            "max_tokens": max_tokens or fields.max_tokens or config.serving.default_max_tokens,
            # top_p 0 keeps only the most likely token: greedy, however hot
            "temperature": 0.0 if fields.top_p == 0 else (fields.temperature or 0.0),
            "top_p": fields.top_p or 1.0,
            "top_k": fields.top_k if fields.top_k is not None else 0,
            "seed": fields.seed,
            "stop": fields.stop_strings(),
            "presence_penalty": fields.presence_penalty or 0.0,
            "frequency_penalty": fields.frequency_penalty or 0.0,
            "logit_bias": fields.logit_bias or {},
            "grammar": None if fields.response_format is None else fields.response_format.grammar(),
            "top_logprobs": top_logprobs,
        }
    )


def echo_scorer(body: api.CompletionRequest, ensemble: EnsembleSpec) -> str:
    """The model whose log-probs score an echoed prompt: the body's `echo_model`, or the
    ensemble's first."""
    if body.echo_model is None:
        return ensemble.models[0]
    if body.echo_model not in ensemble.models:
        raise InvalidRequest(
            f"echo_model: {body.echo_model!r} is not a model of ensemble {ensemble.name!r} "
            f"{list(ensemble.models)}"
        )
    return body.echo_model


def _usage(usage: Usage) -> api.Usage:
    return _choices_usage([usage], 1)


def _choices_usage(usages: Sequence[Usage], n: int) -> api.Usage:
    """The usage of a request of several choices: each prompt counted once (its n samples
    share it), every choice's completion."""
    prompt = sum(u.prompt_tokens for u in usages[::n])
    completion = sum(u.completion_tokens for u in usages)
    return api.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _api_segment(index: int, segment: Segment) -> api.Segment:
    return api.Segment(
        index=index, model=segment.model, text=segment.text, num_tokens=len(segment.token_ids),
        kind=segment.kind, turn=segment.turn, logprobs=list(segment.logprobs),
        gates=list(segment.gates),
    )  # fmt: skip


def _segments(result: GenerationResult) -> list[api.Segment]:
    return [_api_segment(i, s) for i, s in enumerate(result.segments)]


def _segment(event: SegmentEvent) -> api.Segment:
    return _api_segment(event.index, event.segment)


def _sse(data: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


def _error_json(exc: BaseException) -> str:
    err = antiphon_cause(exc)
    note_error(500 if err is None else err.http_status, None if err is None else type(err).__name__)
    if err is None:
        detail = api.ErrorDetail(message=internal_error_message(exc), type="server_error")
    else:
        detail = api.ErrorDetail(
            message=err.message,
            type=_ERROR_TYPES.get(err.http_status, "server_error"),
            code=type(err).__name__,
        )
    return api.ErrorBody(error=detail).model_dump_json()


# --- the app ------------------------------------------------------------------------------------


def create_api(backend: Backend, config: AppConfig) -> FastAPI:
    """The FastAPI app of one ingress replica, calling `backend` for every generation."""
    app = FastAPI(title="antiphon", version=importlib.metadata.version("antiphon"))
    install_error_handlers(app)
    slots = RequestSlots(config.serving.max_concurrent_requests)
    # Middleware added last runs first: the key, then a full server's 503, then the body limit.
    app.add_middleware(BodyLimit, limit=config.serving.max_body_bytes)
    app.add_middleware(RefuseWhenFull, slots=slots)
    api_key = config.serving.api_key_value()
    if api_key is not None:
        app.add_middleware(RequireApiKey, api_key=api_key)
    started = int(time.time())
    v1 = APIRouter(prefix="/v1")

    @asynccontextmanager
    async def in_slots(requests: Sequence[GenerationRequest]):
        slots.acquire(len(requests))
        try:
            with log_context(request_id=requests[0].request_id):
                yield
        finally:
            slots.release(len(requests))

    async def first_then_rest(
        requests: Sequence[GenerationRequest],
        encode: Callable[[int, StreamEvent], Awaitable[list[bytes]]],
        on_error: Callable[[BaseException], bytes],
        tail: bytes = b"",
    ) -> StreamingResponse:
        """Stream `encode(choice, event)` per event of the requests (one per choice, merged
        as they come); the first event is awaited before answering, so an invalid request
        still gets its 4xx instead of a broken 200 stream."""
        slots.acquire(len(requests))
        events = merged([backend.stream(r) for r in requests])
        try:
            first = await anext(events)
        except BaseException:
            slots.release(len(requests))
            await events.aclose()
            raise
        if isinstance(first[1], SegmentEvent):
            note_first_segment()

        async def body() -> AsyncIterator[bytes]:
            try:
                with log_context(request_id=requests[0].request_id):
                    for chunk in await encode(*first):
                        yield chunk
                    async for choice, event in events:
                        for chunk in await encode(choice, event):
                            yield chunk
                    if tail:
                        yield tail
            except Exception as exc:  # the 200 is already sent: report in-stream
                log.warning("stream_failed", error=repr(exc))
                yield on_error(exc)
            finally:
                slots.release(len(requests))
                await events.aclose()  # a client that left early stops the turn loops

        return StreamingResponse(body(), media_type="text/event-stream")

    page = importlib.resources.files("antiphon.deploy").joinpath("playground.html").read_text()

    @app.get(PLAYGROUND_PATH, include_in_schema=False)
    async def playground() -> HTMLResponse:
        """The playground page (static: what it shows it fetches from the API)."""
        return HTMLResponse(page)

    @app.get(LIVENESS_PATH)
    async def health() -> api.HealthBody:
        """Always 200 while this process answers (a liveness probe must not restart a front
        door for a fault behind it); the body says what behind it is degraded."""
        try:
            degraded = await asyncio.wait_for(backend.health(), HEALTH_TIMEOUT_S)
        except TimeoutError:
            degraded = {"coordinator": f"no answer within {HEALTH_TIMEOUT_S:g} s"}
        except Exception as exc:  # the coordinator's failure is what health reports
            degraded = {"coordinator": f"{type(exc).__name__}"}
        return api.HealthBody(status="degraded" if degraded else "ok", degraded=degraded)

    def model_card(ensemble: EnsembleSpec, gates: dict[str, str]) -> api.ModelCard:
        return api.ModelCard(
            id=ensemble.name, created=started, antiphon_models=list(ensemble.models),
            antiphon_policy=ensemble.policy.name, description=ensemble.description,
            antiphon_policy_params=request_params(ensemble.policy.name, ensemble.policy.params),
            antiphon_policies=[ensemble.policy.name]
            + [p for p in nameable_policies() if p != ensemble.policy.name],
            antiphon_gates={m: gates[m] for m in ensemble.models if m in gates},
        )  # fmt: skip

    @v1.get("/models")
    async def models() -> api.ModelList:
        gates = await backend.gates()
        return api.ModelList(data=[model_card(e, gates) for e in config.ensembles])

    @v1.get("/models/{model_id}")
    async def model(model_id: str) -> api.ModelCard:
        ensemble = config.ensemble(model_id)
        note_ensemble(ensemble.name)
        return model_card(ensemble, await backend.gates())

    @v1.post("/generate", response_model=None)
    async def generate(body: api.GenerateRequest) -> api.GenerateResponse | StreamingResponse:
        ensemble = config.ensemble(body.ensemble)
        note_ensemble(ensemble.name)
        if body.messages is not None:
            prompt = await backend.render_chat(ensemble, body.messages)
        else:
            prompt = body.prompt or ""
        request = coordinator_request(body, prompt, ensemble, config)
        log.info("generate", request_id=request.request_id, ensemble=ensemble.name,
                 policy=request.policy, stream=body.stream)  # fmt: skip
        if not body.stream:
            async with in_slots([request]):
                result = await backend.generate(request)
            return api.GenerateResponse(
                id=request.request_id, ensemble=ensemble.name, policy=result.policy,
                text=result.text, segments=_segments(result),
                finish_reason=result.finish_reason, usage=_usage(result.usage),
            )  # fmt: skip

        segments: list[api.Segment] = []

        async def encode(_: int, event: StreamEvent) -> list[bytes]:
            if isinstance(event, SegmentEvent):
                segment = _segment(event)
                segments.append(segment)
                data = api.SegmentEventBody(id=request.request_id, **segment.model_dump())
                return [_sse(data.model_dump_json(), "segment")]
            assert isinstance(event, FinishEvent)
            done = api.GenerateResponse(
                id=request.request_id, ensemble=ensemble.name, policy=request.policy,
                text="".join(s.text for s in segments), segments=segments,
                finish_reason=event.finish_reason, usage=_usage(event.usage),
            )  # fmt: skip
            return [_sse(done.model_dump_json(), "done")]

        return await first_then_rest([request], encode, lambda e: _sse(_error_json(e), "error"))

    async def echoed_prompts(
        prompts: list[str], model: str, top_k: int
    ) -> list[list[WrittenToken]]:
        """Each prompt's tokens with their log-probs (and top_k alternatives) under `model`;
        a slot each meanwhile."""
        slots.acquire(len(prompts))
        try:
            scored = await all_or_none([backend.prompt_logprobs(model, p, top_k) for p in prompts])
        finally:
            slots.release(len(prompts))
        return [await prompt_tokens(model, s, backend.token_texts) for s in scored]

    async def openai_answer(
        body: api.CompletionRequest | api.ChatCompletionRequest, prompts: list[str],
        ensemble: EnsembleSpec, chat: bool, max_tokens: int | None,
    ) -> dict[str, object] | StreamingResponse:  # fmt: skip
        """The OpenAI answer: one coordinator request per choice (n per prompt)."""
        logprobs = body.logprobs is not None and body.logprobs is not False  # 0 and True ask
        alternatives = body.alternatives() if logprobs else 0
        first = coordinator_request(body, prompts[0], ensemble, config, max_tokens, alternatives)
        requests = [
            first.model_copy(
                update={
                    "request_id": choice_request_id(first.request_id, k),
                    "prompt": prompts[k // body.n],
                    "seed": choice_seed(first.seed, k),
                }
            )  # fmt: skip
            for k in range(len(prompts) * body.n)
        ]
        created = int(time.time())
        log.info("openai", request_id=first.request_id, ensemble=ensemble.name, chat=chat,
                 policy=first.policy, stream=body.stream, choices=len(requests))  # fmt: skip

        def response(choices: list, usage: api.Usage | None, obj: str) -> api.OpenAIResponse:
            return api.OpenAIResponse(
                id=first.request_id, object=obj, created=created, model=ensemble.name,
                choices=choices, usage=usage,
            )  # fmt: skip

        # echo (completions, never streamed): each prompt scored by the first model, where
        # its log-probs or its token count are asked for (the echoed text is the prompt's)
        echo = isinstance(body, api.CompletionRequest) and body.echo
        echoed = []
        if echo and (logprobs or body.max_tokens == 0):
            echoed = await echoed_prompts(prompts, echo_scorer(body, ensemble), alternatives)
        if echo and body.max_tokens == 0:  # the prompt alone: a harness's log-likelihood
            choices = [
                api.CompletionChoice(index=k, text=prompts[k // body.n], finish_reason="length",
                    logprobs=completion_logprobs(echoed[k // body.n], 0, alternatives)
                    if logprobs else None)
                for k in range(len(requests))
            ]  # fmt: skip
            scored = sum(len(tokens) for tokens in echoed)
            usage = api.Usage(prompt_tokens=scored, completion_tokens=0, total_tokens=scored)
            return response(choices, usage, "text_completion").model_dump(mode="json")

        if not body.stream:
            async with in_slots(requests):
                results = await all_or_none([backend.generate(r) for r in requests])
            choices = []
            for k, result in enumerate(results):
                finish, segments = openai_finish_reason(result.finish_reason), _segments(result)
                tokens = []
                if logprobs:
                    tokens = (echoed[k // body.n] if echo else []) + await written_tokens(
                        result.segments, backend.token_texts
                    )
                if chat:
                    message = api.ChatMessageOut(role="assistant", content=result.text)
                    choices.append(api.ChatChoice(index=k, message=message, finish_reason=finish,
                        antiphon_segments=segments,
                        logprobs=chat_logprobs(tokens) if logprobs else None))  # fmt: skip
                else:
                    text = prompts[k // body.n] + result.text if echo else result.text
                    choices.append(api.CompletionChoice(index=k, text=text,
                        finish_reason=finish, antiphon_segments=segments,
                        logprobs=completion_logprobs(tokens, 0, alternatives)
                        if logprobs else None))  # fmt: skip
            usage = _choices_usage([r.usage for r in results], body.n)
            out = response(choices, usage, "chat.completion" if chat else "text_completion")
            return out.model_dump(mode="json")

        obj = "chat.completion.chunk" if chat else "text_completion"
        sent_role: set[int] = set()
        usages: dict[int, Usage] = {}

        offsets: dict[int, int] = {}  # choice -> characters streamed (completion logprobs)

        def chunk(
            k: int, text: str | None, finish: str | None, segments: list,
            tokens: list[WrittenToken] | None = None,
        ) -> bytes:  # fmt: skip
            if chat:
                delta = api.ChatMessageOut(content=text)
                if k not in sent_role:
                    delta = api.ChatMessageOut(role="assistant", content=text or "")
                    sent_role.add(k)
                choice = api.ChatChunkChoice(index=k, delta=delta, finish_reason=finish,
                    antiphon_segments=segments,
                    logprobs=chat_logprobs(tokens) if tokens is not None else None)  # fmt: skip
            else:
                choice = api.CompletionChoice(index=k, text=text or "", finish_reason=finish,
                    antiphon_segments=segments,
                    logprobs=completion_logprobs(tokens, offsets.get(k, 0), alternatives)
                    if tokens is not None else None)  # fmt: skip
                offsets[k] = offsets.get(k, 0) + len(text or "")
            return _sse(response([choice], None, obj).model_dump_json())

        async def encode(k: int, event: StreamEvent) -> list[bytes]:
            if isinstance(event, SegmentEvent):
                tokens = None
                if logprobs:
                    tokens = await written_tokens([event.segment], backend.token_texts)
                return [chunk(k, event.text, None, [_segment(event)], tokens)]
            assert isinstance(event, FinishEvent)
            last = [chunk(k, None, openai_finish_reason(event.finish_reason), [])]
            usages[k] = event.usage
            if body.include_usage() and len(usages) == len(requests):
                # as the API says: one more chunk after the choices, none in it, the usage
                usage = _choices_usage([usages[i] for i in range(len(requests))], body.n)
                last.append(_sse(response([], usage, obj).model_dump_json()))
            return last

        return await first_then_rest(
            requests, encode, lambda e: _sse(_error_json(e)), tail=_sse("[DONE]")
        )

    @v1.post("/completions", response_model=None)
    async def completions(body: api.CompletionRequest) -> dict[str, object] | StreamingResponse:
        ensemble = config.ensemble(body.model)
        note_ensemble(ensemble.name)
        first_model = ensemble.models[0]
        prompts = [
            p if isinstance(p, str) else await backend.decode(first_model, p)
            for p in body.prompts()
        ]
        return await openai_answer(body, prompts, ensemble, False, body.max_tokens)

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(
        body: api.ChatCompletionRequest,
    ) -> dict[str, object] | StreamingResponse:
        ensemble = config.ensemble(body.model)
        note_ensemble(ensemble.name)
        prompt = await backend.render_chat(ensemble, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await openai_answer(body, [prompt], ensemble, True, max_tokens)

    @v1.post("/feedback")
    async def feedback(body: api.FeedbackRequest) -> api.FeedbackResponse:
        await backend.feedback(body.request_id, body.reward)
        log.info("feedback", request_id=body.request_id, reward=body.reward)
        return api.FeedbackResponse(request_id=body.request_id, recorded=True)

    app.include_router(v1)
    # Added last, so outermost: it sees every answer, the other middleware's refusals too.
    app.add_middleware(RecordHttpMetrics, endpoints=route_templates(app))
    return app


# --- the Serve deployment ----------------------------------------------------------------------


@serve.ingress()
class Ingress:
    """The HTTP front door: a thin shim that hands requests and feedback to the coordinator
    deployment. Replicas share nothing but the handle."""

    def __init__(self, config: AppConfig, coordinator: DeploymentHandle) -> None:
        configure_logging("json")
        self.config = config
        self.coordinator = coordinator
        self._tokenizers: dict[str, PreTrainedTokenizerBase] = {}  # chat, logprobs: lazily

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self, self.config)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        # Nothing reached the client yet: a coordinator replica that died mid-request costs
        # a second run on the replica Serve starts instead (same request, same seed).
        for attempt in range(1, COORDINATOR_ATTEMPTS):
            try:
                return await unwrapped(self.coordinator.generate.remote(request))
            except RayActorError as e:
                log.warning("coordinator_lost_retrying", attempt=attempt, error=repr(e))
        return await unwrapped(self.coordinator.generate.remote(request))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        # A coordinator replica that dies mid-stream costs a second run on the replica Serve
        # starts instead, resumed after the segments the client already has (the events carry
        # them whole): the client sees one stream, with nothing repeated and nothing missing.
        streamed: list[Segment] = []
        for attempt in range(1, COORDINATOR_ATTEMPTS + 1):
            if streamed:
                request = request.model_copy(update={"resume": tuple(streamed)})
            events = self.coordinator.options(stream=True).stream.remote(request)
            finished = False
            try:
                while True:
                    try:
                        event = await unwrapped(events.__anext__())
                    except StopAsyncIteration:
                        finished = True
                        return
                    yield event
                    if isinstance(event, SegmentEvent):
                        streamed.append(event.segment)
            except RayActorError as e:
                if attempt == COORDINATOR_ATTEMPTS:
                    raise
                log.warning("coordinator_lost_resuming", attempt=attempt,
                            segments_streamed=len(streamed), error=repr(e))  # fmt: skip
            finally:
                if not finished:
                    events.cancel()  # the client left (or failed): stop the turn loop too

    async def feedback(self, request_id: str, reward: float) -> None:
        await unwrapped(self.coordinator.feedback.remote(request_id, reward))

    async def health(self) -> dict[str, str]:
        return await unwrapped(self.coordinator.health.remote())

    async def render_chat(self, ensemble: EnsembleSpec, messages: Sequence[api.ChatMessage]) -> str:
        # The first model reads the prompt first; its chat format is the ensemble's.
        return render_chat(messages, await self._tokenizer(ensemble.models[0]))

    async def prompt_logprobs(self, model: str, prompt: str, top_k: int = 0) -> ScoredPrompt:
        return await unwrapped(self.coordinator.prompt_logprobs.remote(model, prompt, top_k))

    async def gates(self) -> dict[str, str]:
        return await unwrapped(self.coordinator.gates.remote())

    async def decode(self, model: str, token_ids: Sequence[int]) -> str:
        tokenizer = await self._tokenizer(model)
        outside = [t for t in token_ids if not 0 <= t < len(tokenizer)]
        if outside:
            raise InvalidRequest(
                f"prompt: token ids {outside[:5]} are outside the vocabulary of model "
                f"{model!r} ({len(tokenizer)} tokens)"
            )
        return tokenizer.decode(list(token_ids), skip_special_tokens=True)

    async def token_texts(self, model: str, token_ids: Sequence[int]) -> list[str]:
        tokenizer = await self._tokenizer(model)
        return [tokenizer.decode([i], skip_special_tokens=True) for i in token_ids]

    async def _tokenizer(self, name: str) -> PreTrainedTokenizerBase:
        """Model `name`'s tokenizer, loaded on first use (off the event loop)."""
        if name not in self._tokenizers:
            spec = self.config.model(name)
            self._tokenizers[name] = await asyncio.to_thread(
                load_tokenizer, spec.path, spec.trust_remote_code
            )
        return self._tokenizers[name]


def build_ingress(config: AppConfig, coordinator: Application) -> Application:
    """The ingress deployment bound to the coordinator deployment. Each of its
    `serving.ingress_replicas` replicas admits `serving.max_concurrent_requests` at once."""
    # Requests past our slot limit must reach the app to be refused at once (503 with
    # Retry-After); had Serve's limit been near ours, its proxy would queue them instead until
    # a slot freed, and the refusal would come seconds later. Past that headroom too, Serve
    # refuses rather than queue without bound.
    limit = config.serving.max_concurrent_requests
    options = {
        "name": "Ingress",
        "num_replicas": config.serving.ingress_replicas,
        "max_ongoing_requests": limit + SHEDDING_HEADROOM,
        "max_queued_requests": SHEDDING_HEADROOM,
        "ray_actor_options": {"num_cpus": 0},
    }
    return serve.deployment(Ingress, **options).bind(config, coordinator)


__all__ = [
    "Backend",
    "Ingress",
    "RequestSlots",
    "build_ingress",
    "coordinator_request",
    "create_api",
    "error_response",
]
