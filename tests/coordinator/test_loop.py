"""The turn loop over real engines on tiny checkpoints (no Ray): write turns, budgets, stop
strings, cross-tokenizer exchange, session loss, errors, and the turn log."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import structlog
import structlog.testing

from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import FinishEvent, GenerationRequest, SegmentEvent
from antiphon.coordinator.sessions import PROMPT_CHARS_IN_LOOP
from antiphon.errors import InvalidRequest, NotFound, PromptTooLong
from antiphon.messages import SamplingParams
from antiphon.sequence import Segment
from antiphon.training.turn_log import (
    FileTurnSink,
    RequestRecord,
    TurnLogReader,
    TurnLogWriter,
    TurnRecord,
)
from tests.coordinator.conftest import live_sessions

PROMPT = "Once upon a time, "


def request(**kw) -> GenerationRequest:
    fields = dict(prompt=PROMPT, models=("a", "b"), max_tokens=23, temperature=0.0)
    fields.update(kw)
    return GenerationRequest(**fields)


async def alternate_by_hand(engines, tokenizers, names, prompt, seg_len, max_tokens):
    """Round-robin done by hand with the engines alone: the reference for the coordinator.
    Foreign segments go as ids between equal tokenizers, as re-tokenized text otherwise."""
    infos = {n: await engines[n].info() for n in names}
    sids = {}
    for n in names:
        sids[n] = (await engines[n].open(list(tokenizers[n](prompt)["input_ids"]))).session_id
    out, written, turn = [], 0, 0
    while written < max_tokens:
        w = names[turn % len(names)]
        params = SamplingParams(max_new_tokens=min(seg_len, max_tokens - written))
        g = await engines[w].generate(sids[w], params)
        out.append((w, g.token_ids, g.text))
        written += len(g.token_ids)
        if g.finish_reason == "eos":
            break
        for other in names:
            if other == w:
                continue
            if infos[other].tokenizer_fingerprint == infos[w].tokenizer_fingerprint:
                ids = list(g.token_ids)
            else:
                ids = list(tokenizers[other](g.text, add_special_tokens=False)["input_ids"])
            await engines[other].append(sids[other], ids)
        turn += 1
    for n in names:
        await engines[n].close(sids[n])
    return out


async def collect(coordinator: Coordinator, req: GenerationRequest):
    events = [e async for e in coordinator.run(req)]
    assert isinstance(events[-1], FinishEvent)
    assert all(isinstance(e, SegmentEvent) for e in events[:-1])
    return events[:-1], events[-1]


def test_round_robin_equals_alternating_by_hand(engines, tokenizers, coordinator):
    req = request(policy="round_robin", policy_params={"segment_len": 5})
    result = asyncio.run(coordinator.generate(req))
    expected = asyncio.run(alternate_by_hand(engines, tokenizers, ("a", "b"), PROMPT, 5, 23))
    got = [(s.model, s.token_ids, s.text) for s in result.segments]
    assert got == expected
    assert [s.model for s in result.segments][:4] == ["a", "b", "a", "b"]
    assert result.text == "".join(t for _, _, t in expected)
    assert result.usage.completion_tokens == sum(len(i) for _, i, _ in expected)
    assert result.finish_reason in ("length", "eos")
    assert live_sessions(engines) == 0


def test_stream_events_match_result(engines, coordinator):
    req = request(policy="round_robin", policy_params={"segment_len": 4}, max_tokens=13)
    events, finish = asyncio.run(collect(coordinator, req))
    result = asyncio.run(coordinator.generate(req))
    assert [(e.model, e.text, e.token_count) for e in events] == [
        (s.model, s.text, len(s.token_ids)) for s in result.segments
    ]
    assert [e.index for e in events] == list(range(len(events)))
    assert finish.finish_reason == result.finish_reason
    assert finish.usage == result.usage
    assert live_sessions(engines) == 0


def test_fixed_in_segments_equals_one_generate_call(engines, tokenizers, coordinator):
    """Cutting one model's greedy output into segments changes nothing (the cache carries over)."""
    req = request(models=("a",), policy="fixed", policy_params={"model": "a", "segment_len": 3})
    result = asyncio.run(coordinator.generate(req))

    async def one_call():
        s = await engines["a"].open(list(tokenizers["a"](PROMPT)["input_ids"]))
        g = await engines["a"].generate(s.session_id, SamplingParams(max_new_tokens=23))
        await engines["a"].close(s.session_id)
        return g

    g = asyncio.run(one_call())
    assert sum((s.token_ids for s in result.segments), ()) == g.token_ids
    assert result.text == g.text
    assert all(len(s.token_ids) == 3 for s in result.segments[:-1])


def test_stop_string_across_a_segment_boundary(engines, coordinator):
    base = asyncio.run(
        coordinator.generate(request(policy="round_robin", policy_params={"segment_len": 4}))
    )
    texts = [s.text for s in base.segments]
    i = next(i for i in range(len(texts) - 1) if len(texts[i]) >= 2 and len(texts[i + 1]) >= 2)
    stop = texts[i][-2:] + texts[i + 1][:2]  # starts in segment i, ends in segment i + 1
    cut = base.text.find(stop)
    assert cut >= 0
    req = request(policy="round_robin", policy_params={"segment_len": 4}, stop=(stop,))
    events, finish = asyncio.run(collect(coordinator, req))
    assert finish.finish_reason == "stop"
    assert "".join(e.text for e in events) == base.text[:cut]
    assert stop not in "".join(e.text for e in events)
    assert live_sessions(engines) == 0


def test_cross_tokenizer_exchanges_text(engines, tokenizers, coordinator):
    info_a, info_c = asyncio.run(engines["a"].info()), asyncio.run(engines["c"].info())
    assert info_a.tokenizer_fingerprint != info_c.tokenizer_fingerprint
    # Same text, different ids: the tokenizers really differ.
    assert tokenizers["a"]("abc")["input_ids"] != tokenizers["c"]("abc")["input_ids"]
    req = request(models=("a", "c"), policy="round_robin", policy_params={"segment_len": 6})
    result = asyncio.run(coordinator.generate(req))
    expected = asyncio.run(alternate_by_hand(engines, tokenizers, ("a", "c"), PROMPT, 6, 23))
    assert [(s.model, s.token_ids, s.text) for s in result.segments] == expected
    for s in result.segments:  # each segment's ids are in its writer's tokenizer
        assert tokenizers[s.model].decode(s.token_ids, skip_special_tokens=True) == s.text


class ClosingBehindTheBack:
    """A SessionModel that forwards to an engine and, once armed, closes the session it is
    asked to generate on just before the call -- as an evicting or restarted replica would."""

    def __init__(self, engine, lose_on_generate: int) -> None:
        self.engine = engine
        self.lose_on_generate = lose_on_generate  # which generate call (0-based) loses it
        self.generates = 0
        self.opens = 0

    async def info(self):
        return await self.engine.info()

    async def open(self, prompt):
        self.opens += 1
        return await self.engine.open(prompt)

    async def append(self, session_id, token_ids):
        return await self.engine.append(session_id, token_ids)

    async def generate(self, session_id, params, prefix_ids=()):
        if session_id is None:  # opens a session with its prompt
            self.opens += 1
        elif self.generates == self.lose_on_generate:
            await self.engine.close(session_id)
        self.generates += 1
        return await self.engine.generate(session_id, params, prefix_ids)

    async def score(self, session_id, token_ids):
        return await self.engine.score(session_id, token_ids)

    async def fork(self, session_id, n):
        return await self.engine.fork(session_id, n)

    async def truncate(self, session_id, length):
        return await self.engine.truncate(session_id, length)

    async def close(self, session_id):
        await self.engine.close(session_id)


def test_lost_session_is_reopened_from_the_state(engines, tokenizers):
    req = request(policy="round_robin", policy_params={"segment_len": 5})
    reference = asyncio.run(Coordinator(engines, tokenizers).generate(req))
    losing = ClosingBehindTheBack(engines["a"], lose_on_generate=1)  # a's second turn
    coord = Coordinator({**engines, "a": losing}, tokenizers)
    result = asyncio.run(coord.generate(req))
    assert losing.opens == 2  # opened, lost, reopened from prompt + segments
    assert [(s.model, s.token_ids) for s in result.segments] == [
        (s.model, s.token_ids) for s in reference.segments
    ]
    assert live_sessions(engines) == 0


def test_errors_are_typed_and_leave_no_sessions(engines, coordinator):
    with pytest.raises(NotFound, match="zzz"):
        asyncio.run(coordinator.generate(request(models=("a", "zzz"))))
    with pytest.raises(NotFound, match="no_such_policy"):
        asyncio.run(coordinator.generate(request(policy="no_such_policy")))
    with pytest.raises(InvalidRequest, match="'d'.*not in the ensemble"):
        asyncio.run(coordinator.generate(request(policy="fixed", policy_params={"model": "d"})))
    with pytest.raises(InvalidRequest, match="policy_params.segment_len"):
        asyncio.run(coordinator.generate(request(policy_params={"segment_len": -1})))
    assert live_sessions(engines) == 0


def test_cancelled_stream_closes_its_sessions(engines, coordinator):
    async def read_one_then_stop():
        stream = coordinator.run(request(policy_params={"segment_len": 2}, max_tokens=40))
        first = await anext(stream)
        await stream.aclose()
        return first

    first = asyncio.run(read_one_then_stop())
    assert isinstance(first, SegmentEvent)
    assert live_sessions(engines) == 0


def test_turn_log_records_a_request_completely_and_in_order(engines, tokenizers, tmp_path):
    path = tmp_path / "turns.atl"
    with TurnLogWriter(path) as writer:
        coord = Coordinator(engines, tokenizers, turn_sink=FileTurnSink(writer))
        req = request(policy="round_robin", policy_params={"segment_len": 5}, seed=7)
        result = asyncio.run(coord.generate(req))
    records = [r for r, _ in TurnLogReader(path)]
    turns = [r for r in records if isinstance(r, TurnRecord)]
    assert [r.segment for r in turns] == list(range(len(result.segments)))
    assert [r.turn for r in turns] == [s.turn for s in result.segments]
    assert [(r.model, r.token_ids, r.text) for r in turns] == [
        (s.model, s.token_ids, s.text) for s in result.segments
    ]
    assert all(r.request_id == req.request_id and r.policy == "round_robin" for r in turns)
    assert all(r.decision["kind"] == "write" and r.decision["max_tokens"] == 5 for r in turns)
    assert all(len(r.logprobs) == len(r.token_ids) for r in turns)
    (summary,) = [r for r in records if isinstance(r, RequestRecord)]
    assert records[-1] is summary  # after its turns
    assert summary.num_segments == len(turns) and summary.text == result.text
    assert summary.prompt == PROMPT and summary.finish_reason == result.finish_reason
    # times: each turn's when its segment was committed (in order, before the summary's),
    # its wall time covering its model time
    times = [r.time for r in turns]
    assert times == sorted(times) and times[-1] <= summary.time
    assert times[0] < times[-1]  # not all stamped at once when the request ended
    assert all(r.wall_ms >= r.model_ms + r.policy_ms > 0 for r in turns)


def test_background_ending_closes_sessions_and_logs_after_the_answer(engines, tokenizers, tmp_path):
    path = tmp_path / "turns.atl"

    async def go(coord):
        result = await coord.generate(request(policy_params={"segment_len": 4}))
        await coord.drain()  # the request's sessions closed and its records sent
        return result

    with TurnLogWriter(path) as writer:
        coord = Coordinator(
            engines, tokenizers, turn_sink=FileTurnSink(writer), close_in_background=True
        )
        result = asyncio.run(go(coord))
    assert live_sessions(engines) == 0
    records = [r for r, _ in TurnLogReader(path)]
    assert "".join(r.text for r in records if isinstance(r, TurnRecord)) == result.text
    assert isinstance(records[-1], RequestRecord)


@pytest.fixture()
def captured_logs():
    """structlog lines written in this test, with the context the loop binds merged in."""
    saved = structlog.get_config()
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    yield capture.entries
    structlog.configure(**saved)


def test_log_lines_carry_request_id_and_turn(engines, tokenizers, captured_logs):
    losing = ClosingBehindTheBack(engines["a"], lose_on_generate=1)  # lost on a's 2nd turn
    coord = Coordinator({**engines, "a": losing}, tokenizers)
    req = request(policy="round_robin", policy_params={"segment_len": 5})
    result = asyncio.run(coord.generate(req))
    (lost,) = [e for e in captured_logs if e["event"] == "session_lost"]
    assert lost["request_id"] == req.request_id and lost["model"] == "a"
    assert lost["turn"] == 2 == [s.turn for s in result.segments if s.model == "a"][1]
    assert lost["log_level"] == "warning"


def test_a_resumed_request_streams_only_what_follows_and_ends_like_the_whole_run(coordinator):
    """What the ingress does when a coordinator dies mid-stream: the same request, resumed
    after the segments already streamed, goes on from the next turn (the policy decides
    from the view, so round robin hands the next turn to the next writer)."""
    req = request(policy="round_robin", policy_params={"segment_len": 3})
    whole, _ = asyncio.run(collect(coordinator, req))
    sent = tuple(e.segment for e in whole[:3])
    rest, finish = asyncio.run(collect(coordinator, req.model_copy(update={"resume": sent})))
    assert [e.index for e in rest] == list(range(3, 3 + len(rest)))
    assert [e.model for e in rest][:2] == [e.model for e in whole[3:5]]
    assert finish.usage.completion_tokens == 23
    # greedy, but the resumed writers read the sent segments in one prefill: the same tokens
    assert [e.segment.token_ids for e in rest] == [e.segment.token_ids for e in whole[3:]]


def test_resumed_segments_must_come_from_the_ensemble():
    seg = Segment("c", (1,), "x", (0.0,), 0)
    with pytest.raises(InvalidRequest, match=r"models \['c'\] not in the ensemble"):
        GenerationRequest.parse({"prompt": PROMPT, "models": ["a", "b"], "resume": [seg]})


class ThreadNoting:
    """A tokenizer that notes the thread of each call and passes it on to the real one."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.threads: list[str] = []

    def __call__(self, text, **kw):
        self.threads.append(threading.current_thread().name)
        return self.tokenizer(text, **kw)


def test_a_long_prompt_is_tokenized_off_the_event_loop(engines, tokenizers):
    """A prompt of a megabyte takes about a second per tokenizer: not on the loop that runs
    every other request."""
    noting = {n: ThreadNoting(t) for n, t in tokenizers.items()}
    coordinator = Coordinator(engines, noting)
    long = request(prompt="y" * (PROMPT_CHARS_IN_LOOP + 1), max_tokens=2)
    with pytest.raises(PromptTooLong):  # longer than the tiny models' context
        asyncio.run(coordinator.generate(long))
    first_calls = [noting[n].threads[0] for n in long.models]  # the prompt's, in each
    assert first_calls and "MainThread" not in first_calls
    short = {n: ThreadNoting(t) for n, t in tokenizers.items()}
    asyncio.run(Coordinator(engines, short).generate(request(max_tokens=2)))
    assert short["a"].threads[0] == "MainThread"  # a short one is not worth the hop
