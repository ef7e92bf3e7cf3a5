"""antiphon.Client and AsyncClient against the real test server: typed answers, streaming,
feedback, models, and server errors raised as antiphon's typed errors."""

from __future__ import annotations

import asyncio

import pytest

import antiphon
from antiphon.deploy.api import GenerateResponse, HealthBody, Segment
from antiphon.errors import InvalidRequest, NotFound, PromptTooLong, Unauthorized
from antiphon.training.turn_log import FeedbackRecord, read_records
from tests.deploy.server import API_KEY, RunningServer

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(server):
    with antiphon.Client(server.url, api_key=API_KEY) as c:
        yield c


def feedback_rewards(server: RunningServer, request_id: str) -> list[float]:
    return [r.reward for r, _ in read_records(server.turn_log)
            if isinstance(r, FeedbackRecord) and r.request_id == request_id]  # fmt: skip


def test_generate_returns_typed_answer(client):
    answer = client.generate(PROMPT, ensemble="pair", max_tokens=10)
    assert isinstance(answer, GenerateResponse)
    assert answer.text == "".join(s.text for s in answer.segments)
    assert [s.model for s in answer.segments][:2] == ["a", "b"][: len(answer.segments)]


def test_stream_yields_segments_then_holds_the_result(client):
    whole = client.generate(PROMPT, ensemble="pair", max_tokens=10)
    stream = client.stream(PROMPT, ensemble="pair", max_tokens=10)
    segments = list(stream)
    assert all(isinstance(s, Segment) for s in segments)
    assert "".join(s.text for s in segments) == whole.text  # greedy: same answer
    assert stream.result is not None and stream.result.text == whole.text


def test_chat_messages_and_policy_choice(client):
    answer = client.generate(
        messages=[{"role": "user", "content": "Hi"}], policy="fixed",
        policy_params={"model": "b"}, max_tokens=6,
    )  # fmt: skip
    assert answer.policy == "fixed" and {s.model for s in answer.segments} == {"b"}


def test_feedback_reaches_the_turn_log(client, server):
    answer = client.generate(PROMPT, max_tokens=4)
    ack = client.feedback(answer.id, 1.0)
    assert ack.recorded
    assert feedback_rewards(server, answer.id) == [1.0]


def test_feedback_for_an_id_never_served_is_not_found(client):
    with pytest.raises(NotFound, match="no request with id 'nobody' in the turn log"):
        client.feedback("nobody", 1.0)


def test_models_lists_ensembles(client):
    assert [(m.id, m.antiphon_models) for m in client.models()] == [
        ("pair", ["a", "b"]),
        ("solo", ["a"]),
        ("switched", ["a", "b"]),
        ("trio", ["a", "b", "switcher"]),
        ("deferred", ["b", "a"]),
    ]


def test_server_errors_are_typed(client, server):
    with pytest.raises(NotFound, match="unknown ensemble 'nope'"):
        client.generate(PROMPT, ensemble="nope")
    with pytest.raises(NotFound, match="unknown policy"):
        list(client.stream(PROMPT, policy="nope"))
    with pytest.raises(InvalidRequest, match="max_tokens"):
        client.generate(PROMPT, max_tokens=0)
    with pytest.raises(PromptTooLong):
        client.generate("x" * 600)
    with antiphon.Client(server.url) as anonymous, pytest.raises(Unauthorized):
        anonymous.models()
    assert client.health() == HealthBody(status="ok")


def test_async_client_generate_stream_feedback(server):
    async def main() -> None:
        async with antiphon.AsyncClient(server.url, api_key=API_KEY) as client:
            answers = await asyncio.gather(
                client.generate(PROMPT, max_tokens=8), client.generate("Hello", max_tokens=8)
            )
            assert all(a.text == "".join(s.text for s in a.segments) for a in answers)
            stream = client.stream(PROMPT, max_tokens=8)
            streamed = [s async for s in stream]
            assert "".join(s.text for s in streamed) == answers[0].text
            assert stream.result is not None and stream.result.id
            assert (await client.feedback(answers[1].id, -0.5)).recorded
            assert [m.id for m in await client.models()] == [
                "pair",
                "solo",
                "switched",
                "trio",
                "deferred",
            ]
            with pytest.raises(NotFound):
                await client.generate(PROMPT, ensemble="nope")
            assert await client.health() == HealthBody(status="ok")
        assert feedback_rewards(server, answers[1].id) == [-0.5]

    asyncio.run(main())
