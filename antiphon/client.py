"""Python clients of a running antiphon server: `Client` (sync) and `AsyncClient`.

    import antiphon
    client = antiphon.Client("http://127.0.0.1:8000")
    answer = client.generate("Once upon a time", max_tokens=64)
    for segment in answer.segments:
        print(segment.model, repr(segment.text))
    client.feedback(answer.id, reward=1.0)

    stream = client.stream("Once upon a time", policy="round_robin")
    for segment in stream:          # one Segment per turn, as the models write them
        print(segment.model, segment.text)
    print(stream.result.finish_reason)   # the full answer, once the stream has ended

Results are the API's pydantic models (`GenerateResponse`, `Segment`, `ModelCard`). A server
error is raised as the antiphon error it names (`NotFound`, `InvalidRequest`,
`PromptTooLong`, `Overloaded`, `Unauthorized`, ...) with the server's message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TypeVar

import httpx
from pydantic import BaseModel

from antiphon.config import PolicyParamValue
from antiphon.deploy.api import (
    ChatMessage,
    ErrorBody,
    FeedbackResponse,
    GenerateResponse,
    HealthBody,
    ModelCard,
    ModelList,
    Segment,
    SegmentEventBody,
)
from antiphon.errors import (
    AntiphonError,
    ConfigError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PromptTooLong,
    SessionLost,
    Unauthorized,
    Unreachable,
)

_ERRORS_BY_CODE: dict[str, type[AntiphonError]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequest,
        PromptTooLong,
        NotFound,
        SessionLost,
        Overloaded,
        ConfigError,
        Unauthorized,
        Unreachable,
    )
}
_ERRORS_BY_STATUS: dict[int, type[AntiphonError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: SessionLost,
    422: InvalidRequest,
    502: Unreachable,
    503: Overloaded,
}

Message = ChatMessage | dict[str, str]
_T = TypeVar("_T", bound=BaseModel)


def _error_from(status: int, body: bytes) -> AntiphonError:
    """The antiphon error a server error answer stands for."""
    try:
        detail = ErrorBody.model_validate_json(body).error
    except ValueError:
        text = body.decode(errors="replace").strip()[:500]
        return _ERRORS_BY_STATUS.get(status, AntiphonError)(f"HTTP {status}: {text}")
    cls = _ERRORS_BY_CODE.get(detail.code or "") or _ERRORS_BY_STATUS.get(status, AntiphonError)
    return cls(detail.message)


def _generate_body(
    prompt: str | None,
    messages: list[Message] | None,
    stream: bool,
    options: dict[str, object],
) -> dict[str, object]:
    body: dict[str, object] = {"stream": stream}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = [
            m.model_dump() if isinstance(m, ChatMessage) else dict(m) for m in messages
        ]
    body.update({k: v for k, v in options.items() if v is not None})
    return body


class _SSEParser:
    """Server-sent events from lines: feed lines, get (event, data) pairs at blank lines."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if line == "":
            if not self.data:
                return None
            out = (self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None  # comment (keep-alive)
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self.event = value
        elif field == "data":
            self.data.append(value)
        return None


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent-events body, from its lines as they arrive (e.g.
    `sse_events(response.iter_lines())` of an httpx stream)."""
    parser = _SSEParser()
    for line in lines:
        got = parser.feed(line)
        if got is not None:
            yield got


def _segment_or_result(event: str, data: str) -> Segment | GenerateResponse:
    """Decode one event of a /v1/generate stream; an error event raises."""
    if event == "segment":
        return SegmentEventBody.model_validate_json(data)
    if event == "done":
        return GenerateResponse.model_validate_json(data)
    if event == "error":
        raise _error_from(500, data.encode())
    raise AntiphonError(f"unexpected server-sent event {event!r}: {data[:200]}")


class GenerationStream:
    """Iterates the segments of a streamed answer; `result` holds the full answer at the end."""

    def __init__(self, client: httpx.Client, body: dict[str, object]) -> None:
        self._client = client
        self._body = body
        self.result: GenerateResponse | None = None  # set when the final event arrives

    def __iter__(self) -> Iterator[Segment]:
        with self._client.stream("POST", "/v1/generate", json=self._body) as response:
            if response.status_code >= 400:
                raise _error_from(response.status_code, response.read())
            parser = _SSEParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is None:
                    continue
                item = _segment_or_result(*event)
                if isinstance(item, GenerateResponse):
                    self.result = item
                else:
                    yield item


class AsyncGenerationStream:
    """Async twin of `GenerationStream`: `async for segment in stream`, then `stream.result`."""

    def __init__(self, client: httpx.AsyncClient, body: dict[str, object]) -> None:
        self._client = client
        self._body = body
        self.result: GenerateResponse | None = None

    async def __aiter__(self) -> AsyncIterator[Segment]:
        async with self._client.stream("POST", "/v1/generate", json=self._body) as response:
            if response.status_code >= 400:
                raise _error_from(response.status_code, await response.aread())
            parser = _SSEParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is None:
                    continue
                item = _segment_or_result(*event)
                if isinstance(item, GenerateResponse):
                    self.result = item
                else:
                    yield item


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _parse(response: httpx.Response, model: type[_T]) -> _T:
    if response.status_code >= 400:
        raise _error_from(response.status_code, response.content)
    return model.model_validate_json(response.content)


def _health(response: httpx.Response) -> HealthBody | None:
    """The health body of an answer, None if it is not one (no antiphon server there)."""
    if response.status_code != 200:
        return None
    try:
        return HealthBody.model_validate(response.json())
    except ValueError:
        return None


class Client:
    """Blocking client of an antiphon server (`antiphon serve`)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[Message] | None = None,
        ensemble: str | None = None,
        policy: str | None = None,
        policy_params: dict[str, PolicyParamValue] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> GenerateResponse:
        """One answer, written by the ensemble's models in turns (give prompt or messages)."""
        options = dict(ensemble=ensemble, policy=policy, policy_params=policy_params,
                       max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, stop=stop)  # fmt: skip
        body = _generate_body(prompt, messages, False, options)
        return _parse(self._http.post("/v1/generate", json=body), GenerateResponse)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[Message] | None = None,
        ensemble: str | None = None,
        policy: str | None = None,
        policy_params: dict[str, PolicyParamValue] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> GenerationStream:
        """Like `generate`, but iterate the segments as they are written."""
        options = dict(ensemble=ensemble, policy=policy, policy_params=policy_params,
                       max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, stop=stop)  # fmt: skip
        return GenerationStream(self._http, _generate_body(prompt, messages, True, options))

    def feedback(self, request_id: str, reward: float) -> FeedbackResponse:
        """Log a reward for a finished request (its `id`) beside its turns; NotFound for an id
        the turn log does not hold."""
        body = {"request_id": request_id, "reward": reward}
        return _parse(self._http.post("/v1/feedback", json=body), FeedbackResponse)

    def models(self) -> list[ModelCard]:
        """The ensembles the server offers."""
        return _parse(self._http.get("/v1/models"), ModelList).data

    def health(self) -> HealthBody | None:
        """The server's health check ("ok", or "degraded" and what is), None if no server
        answers it."""
        try:
            return _health(self._http.get("/health"))
        except httpx.TransportError:
            return None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client of an antiphon server; the same methods as `Client`, awaited."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout
        )

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[Message] | None = None,
        ensemble: str | None = None,
        policy: str | None = None,
        policy_params: dict[str, PolicyParamValue] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> GenerateResponse:
        """One answer, written by the ensemble's models in turns (give prompt or messages)."""
        options = dict(ensemble=ensemble, policy=policy, policy_params=policy_params,
                       max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, stop=stop)  # fmt: skip
        body = _generate_body(prompt, messages, False, options)
        return _parse(await self._http.post("/v1/generate", json=body), GenerateResponse)

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[Message] | None = None,
        ensemble: str | None = None,
        policy: str | None = None,
        policy_params: dict[str, PolicyParamValue] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> AsyncGenerationStream:
        """Like `generate`, but `async for` the segments as they are written."""
        options = dict(ensemble=ensemble, policy=policy, policy_params=policy_params,
                       max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, stop=stop)  # fmt: skip
        return AsyncGenerationStream(self._http, _generate_body(prompt, messages, True, options))

    async def feedback(self, request_id: str, reward: float) -> FeedbackResponse:
        """Log a reward for a finished request (its `id`) beside its turns; NotFound for an id
        the turn log does not hold."""
        body = {"request_id": request_id, "reward": reward}
        return _parse(await self._http.post("/v1/feedback", json=body), FeedbackResponse)

    async def models(self) -> list[ModelCard]:
        """The ensembles the server offers."""
        return _parse(await self._http.get("/v1/models"), ModelList).data

    async def health(self) -> HealthBody | None:
        """The server's health check ("ok", or "degraded" and what is), None if no server
        answers it."""
        try:
            return _health(await self._http.get("/health"))
        except httpx.TransportError:
            return None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["Client", "AsyncClient", "GenerationStream", "AsyncGenerationStream"]
