"""Direct session calls without Ray: a `DirectServer` over a real engine, real TCP connections.

What a channel answers must be what the engine answers; its errors come back as their class;
a peer that does not speak the protocol (no token, a wrong token, bytes that are no frame)
loses its own connection and nothing else.

    python -m pytest tests/actors/test_direct.py -q
"""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest

from antiphon.actors.direct import (
    MAX_FRAME_BYTES,
    ChannelLost,
    DirectAddress,
    DirectChannel,
    DirectServer,
    encode,
)
from antiphon.actors.engine import ModelEngine
from antiphon.errors import InvalidRequest, SessionLost
from antiphon.messages import Generation, SamplingParams, SessionInfo, TeacherForced

PROMPT = [5, 17, 30, 42, 8]
NEVER_HANG_S = 30.0  # a guard, not a timing assertion: the call must answer, not wait forever


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def engine(spec):
    eng = ModelEngine(spec)
    yield eng
    asyncio.run(eng.shutdown())


def serving(engine, test):
    """Run `test(server, channel)` with a DirectServer over the engine and one channel to it."""

    async def go():
        server = DirectServer(engine)
        channel = await DirectChannel.connect(await server.address())
        try:
            return await asyncio.wait_for(test(server, channel), NEVER_HANG_S)
        finally:
            await channel.close()
            await server.close()

    return asyncio.run(go())


async def raw_connection(address: DirectAddress, first: bytes):
    """A TCP connection to the server that sends `first` and nothing else of the protocol."""
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(first)
    await writer.drain()
    return reader, writer


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), NEVER_HANG_S) == b""


def test_every_session_call_answers_what_the_engine_answers(engine):
    async def test(server, channel):
        a = (await engine.open(PROMPT)).session_id
        b = (await engine.open(PROMPT)).session_id
        results = []
        for session, call in ((a, engine_call), (b, channel.call)):
            results.append(
                [
                    await call("append", [session, [20, 21]]),
                    await call("generate", [session, greedy(4, logprobs_top_k=2), [9]]),
                    await call("score", [session, [30, 31], True]),
                    await call("teacher_force", [session, [32, 33], 2]),
                    await call("next_token_logprobs", [session, [3, 4, 5]]),
                ]
            )
            [child] = await call("fork", [session, 1, 6])
            results[-1].append(await call("truncate", [child, 4]))
            results[-1].append(await call("generate", [child, greedy(3), []]))
            await call("close", [child])
        ours, theirs = results
        assert isinstance(theirs[0], SessionInfo) and isinstance(theirs[1], Generation)
        assert isinstance(theirs[3], TeacherForced)
        # equal up to the session ids the results carry
        assert strip_ids(theirs) == strip_ids(ours)
        assert theirs[1].top_logprobs and len(theirs[1].token_ids) == 4

    async def engine_call(method, args):
        return await getattr(engine, method)(*args)

    serving(engine, test)


def strip_ids(results: list) -> list:
    def strip(r):
        if isinstance(r, SessionInfo | Generation):
            return {k: v for k, v in asdict(r).items() if k != "session_id"}
        return asdict(r) if isinstance(r, TeacherForced) else list(r)

    return [strip(r) for r in results]


def asdict(r) -> dict:
    return {k: getattr(r, k) for k in r.__dataclass_fields__}


def test_antiphon_errors_come_back_as_their_class_and_the_channel_stays(engine):
    async def test(server, channel):
        s = (await engine.open(PROMPT)).session_id
        with pytest.raises(InvalidRequest, match="vocabulary"):
            await channel.call("append", [s, [10**6]])
        with pytest.raises(SessionLost):
            await channel.call("generate", ["no-such-session", greedy(2), []])
        with pytest.raises(InvalidRequest, match="not a session call"):
            await channel.call("open", [PROMPT])  # opening goes through Serve, never direct
        with pytest.raises(InvalidRequest, match="not a session call"):
            await channel.call("shutdown", [])
        # a call the engine cannot take at all comes back named, not as a dropped connection
        with pytest.raises(RuntimeError, match="TypeError"):
            await channel.call("truncate", [s])
        # nothing was appended by the refused calls, and the channel still serves
        info = await channel.call("append", [s, [20]])
        assert info.length == len(PROMPT) + 1 and not channel.closed

    serving(engine, test)


def test_messages_cross_with_every_field(engine):
    params = SamplingParams(
        max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=5, seed=11, stop_token_ids=(3,),
        stop_strings=("zz",), logprobs_top_k=2, ignore_eos=True, presence_penalty=0.5,
        frequency_penalty=0.25, logit_bias=((7, 2.0),), response_start=2,
    )  # fmt: skip

    async def test(server, channel):
        a = (await engine.open(PROMPT)).session_id
        b = (await engine.open(PROMPT)).session_id
        theirs = await channel.call("generate", [b, params, []])
        ours = await engine.generate(a, params)
        assert strip_ids([theirs]) == strip_ids([ours])

    serving(engine, test)
    # an object that is no message of the protocol is refused before it is sent
    with pytest.raises(TypeError, match="cannot send"):
        encode([1, "generate", [object()]])


def test_a_wrong_or_missing_token_closes_only_that_connection(engine):
    async def test(server, channel):
        address = await server.address()
        wrong = DirectAddress(address.replica_id, address.host, address.port, "0" * 32)
        intruder = await DirectChannel.connect(wrong)
        with pytest.raises(ChannelLost):
            await intruder.call("close", ["any"])
        reader, writer = await raw_connection(address, encode([1, "close", ["any"]]))
        assert await closed_by_peer(reader)  # a call before the token
        writer.close()
        s = (await engine.open(PROMPT)).session_id
        assert (await channel.call("append", [s, [20]])).length == len(PROMPT) + 1

    serving(engine, test)


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">I", 100) + b"abc",  # a frame cut short: the peer hangs up before its end
        struct.pack(">I", MAX_FRAME_BYTES + 1),  # a frame claiming to be too long
        struct.pack(">I", 1) + b"\xc1",  # a byte msgpack never writes
        encode(42),  # msgpack, but no frame of the protocol
        encode([1, "append"]),  # a call without its arguments
        struct.pack(">I", 3) + msgpack.packb(msgpack.ExtType(9, b"x")),  # an unknown extension
    ],
)
def test_bytes_that_are_no_frame_drop_that_connection_only(engine, garbage):
    async def test(server, channel):
        address = await server.address()
        reader, writer = await raw_connection(address, encode(address.token) + garbage)
        writer.write_eof()  # so a frame cut short ends instead of waiting for its rest
        assert await closed_by_peer(reader)
        writer.close()
        s = (await engine.open(PROMPT)).session_id
        assert (await channel.call("append", [s, [20]])).length == len(PROMPT) + 1

    serving(engine, test)


def test_a_cancelled_call_leaves_the_channel_serving(engine):
    async def test(server, channel):
        long_run = (await engine.open(PROMPT)).session_id
        other = (await engine.open(PROMPT)).session_id
        call = asyncio.ensure_future(channel.call("generate", [long_run, greedy(200), []]))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        g = await channel.call("generate", [other, greedy(2), []])
        assert len(g.token_ids) == 2 and not channel.closed
        # the cancelled call's session stays usable once its generation is over
        assert (await channel.call("append", [long_run, [20]])).session_id == long_run

    serving(engine, test)


def test_calls_in_flight_when_the_server_goes_fail_with_channel_lost(engine):
    async def test(server, channel):
        s = (await engine.open(PROMPT)).session_id
        address = await server.address()
        call = asyncio.ensure_future(channel.call("generate", [s, greedy(200), []]))
        await asyncio.sleep(0.05)
        await server.close()
        with pytest.raises(ChannelLost):
            await call
        assert channel.closed
        with pytest.raises(ChannelLost, match="closed"):
            await channel.call("append", [s, [20]])
        with pytest.raises(OSError):  # nothing listens there any more
            await DirectChannel.connect(address)

    serving(engine, test)


def test_calls_of_many_sessions_on_one_channel_run_side_by_side(engine):
    """Calls on one connection are served concurrently: the engine batches them."""

    async def test(server, channel):
        alone, passes_alone = [], engine.stats().forward_passes
        for i in range(6):
            s = (await engine.open(PROMPT + [i])).session_id
            alone.append(await engine.generate(s, greedy(8)))
        sessions = [(await engine.open(PROMPT + [i])).session_id for i in range(6)]
        passes_alone = engine.stats().forward_passes - passes_alone
        before = engine.stats().forward_passes
        together = await asyncio.gather(
            *[channel.call("generate", [s, greedy(8), []]) for s in sessions]
        )
        passes_together = engine.stats().forward_passes - before
        assert [g.token_ids for g in together] == [g.token_ids for g in alone]
        assert passes_together < passes_alone / 2  # decode steps shared across the calls

    serving(engine, test)
