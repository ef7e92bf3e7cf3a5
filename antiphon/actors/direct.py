"""Direct session calls: a session's calls reach its replica over one kept TCP connection,
not through Serve's handle path.

Why: a call through a deployment handle (the router in the caller, the request wrapper on the
replica) costs a few milliseconds, several tokens of a small model, and a turn makes one such
call. A session is pinned to its home replica anyway (`antiphon.actors.affinity`), so after
its first call there is nothing left to route: the caller can talk to that replica itself.

    server = DirectServer(model_server)            # in the replica, on its event loop
    address = await server.address()               # listening from here on
    channel = await DirectChannel.connect(address)  # in the caller
    generation = await channel.call("generate", [session_id, params, prefix_ids])

- Only session calls go direct (`DIRECT_METHODS`); calls that open a session still go
  through Serve, which spreads them over replicas and counts them.
- Frames are a 4-byte big-endian length and a msgpack body: a call `[id, method, args]`,
  a cancel `[id]`, an answer `[id, 0, result]` or `[id, 1, [error class, message]]`. The
  messages of `antiphon.messages` travel as a msgpack extension holding their fields, and an
  antiphon error comes back as its own class. Nothing is unpickled.
- The replica makes a random token, handed out with its address through Serve; a connection
  must send it as its first frame or is closed.
- A connection that breaks fails the calls in flight on it with `ChannelLost`; the client
  turns that into `SessionLost`, as it does a replica that died under a Serve call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from antiphon.errors import AntiphonError, InvalidRequest
from antiphon.logging import get_logger
from antiphon.messages import Generation, SamplingParams, SessionInfo, TeacherForced

log = get_logger(__name__)

# The session calls a channel carries: each takes the session id first.
DIRECT_METHODS = frozenset(
    {"append", "generate", "score", "teacher_force", "next_token_logprobs", "fork",
     "truncate", "close"}
)  # fmt: skip
MAX_FRAME_BYTES = 64 << 20  # a frame longer than this is a broken or hostile peer
_MESSAGE_EXT = 1  # msgpack extension code of a message struct
_MESSAGES = {cls.__name__: cls for cls in (SamplingParams, SessionInfo, Generation, TeacherForced)}
_HEADER = struct.Struct(">I")


class ChannelLost(Exception):
    """The connection to the replica broke (or never answered) with this call in flight."""


@dataclass(frozen=True, slots=True)
class DirectAddress:
    """Where a replica takes direct calls, and the token a connection must show."""

    replica_id: str  # the replica's Serve id ("" outside Serve)
    host: str
    port: int
    token: str


# -- the wire --------------------------------------------------------------------------------


def _default(obj: object) -> msgpack.ExtType:
    name = type(obj).__name__
    if _MESSAGES.get(name) is not type(obj):
        raise TypeError(f"cannot send a {name} over a direct channel")
    fields = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return msgpack.ExtType(_MESSAGE_EXT, msgpack.packb([name, fields], default=_default))


def _ext_hook(code: int, data: bytes) -> object:
    if code != _MESSAGE_EXT:
        raise InvalidRequest(f"direct channel: unknown extension type {code}")
    name, fields = msgpack.unpackb(data, ext_hook=_ext_hook, use_list=False)
    cls = _MESSAGES.get(name)
    if cls is None:
        raise InvalidRequest(f"direct channel: unknown message type {name!r}")
    return cls(*fields)  # validated by the struct itself, as on any other path


def encode(frame: list) -> bytes:
    body = msgpack.packb(frame, default=_default)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's body, decoded (tuples for arrays); raises IncompleteReadError at the
    end of the stream, InvalidRequest for a frame too long or not msgpack."""
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise InvalidRequest(f"direct channel: a frame of {size} bytes (at most {MAX_FRAME_BYTES})")
    body = await reader.readexactly(size)
    try:
        return msgpack.unpackb(body, ext_hook=_ext_hook, use_list=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise InvalidRequest(f"direct channel: a frame that is not msgpack ({e})") from None


def _error_classes(base: type[AntiphonError] = AntiphonError) -> dict[str, type[AntiphonError]]:
    found = {base.__name__: base}
    for sub in base.__subclasses__():
        found.update(_error_classes(sub))
    return found


def error_from_wire(name: str, message: str) -> Exception:
    """An antiphon error comes back as its class; anything else as a RuntimeError naming it."""
    cls = _error_classes().get(name)
    return cls(message) if cls is not None else RuntimeError(f"{name}: {message}")


# -- the replica's side ----------------------------------------------------------------------


class DirectServer:
    """Serves `DIRECT_METHODS` of `target` (a `ModelServer`, or anything with those async
    methods) to connections that show the token. Started on first `address()`, on the
    running event loop; each call runs as its own task, so calls of different sessions on one
    connection run side by side, as through Serve."""

    def __init__(self, target: Any, host: str = "127.0.0.1", replica_id: str = "") -> None:
        self.target = target
        self.host = host
        self.replica_id = replica_id
        self.token = secrets.token_hex(16)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def address(self) -> DirectAddress:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self.host, 0)
        port = self._server.sockets[0].getsockname()[1]
        return DirectAddress(self.replica_id, self.host, port, self.token)

    async def close(self) -> None:
        """Stop listening and drop every connection (calls in flight on them are cancelled)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())
        calls: dict[int, asyncio.Task] = {}
        try:
            if not await self._authenticated(reader):
                return
            while True:
                frame = await read_frame(reader)
                if len(frame) == 1:  # the caller gave up on a call
                    task = calls.get(frame[0])
                    if task is not None:
                        task.cancel()
                    continue
                call_id, method, args = frame
                task = asyncio.create_task(self._answer(writer, call_id, method, args))
                calls[call_id] = task
                task.add_done_callback(lambda _, i=call_id: calls.pop(i, None))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller hung up
        except (InvalidRequest, ValueError, TypeError) as e:  # not our protocol: drop it
            log.warning("direct_channel_refused", peer=str(writer.get_extra_info("peername")),
                        error=str(e))  # fmt: skip
        finally:
            for task in calls.values():
                task.cancel()
            writer.close()
            self._connections.discard(asyncio.current_task())

    async def _authenticated(self, reader: asyncio.StreamReader) -> bool:
        try:
            token = await asyncio.wait_for(read_frame(reader), timeout=10.0)
        except (TimeoutError, InvalidRequest):
            return False
        return isinstance(token, str) and hmac.compare_digest(token, self.token)

    async def _answer(self, writer: asyncio.StreamWriter, call_id: int, method: str,
                      args: tuple) -> None:  # fmt: skip
        try:
            if method not in DIRECT_METHODS:
                raise InvalidRequest(f"direct channel: {method!r} is not a session call")
            result = await getattr(self.target, method)(*args)
            frame = [call_id, 0, result]
        except asyncio.CancelledError:
            return  # the caller cancelled it: nobody waits for an answer
        except Exception as e:
            message = e.message if isinstance(e, AntiphonError) else str(e)
            frame = [call_id, 1, [type(e).__name__, message]]
        if not writer.is_closing():
            writer.write(encode(frame))


# -- the caller's side -----------------------------------------------------------------------


class DirectChannel:
    """One connection to one replica, shared by every call to it from this event loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.loop = asyncio.get_running_loop()
        self._writer = writer
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self.closed = False
        self._reader = asyncio.create_task(self._read(reader))

    @classmethod
    async def connect(cls, address: DirectAddress, timeout_s: float = 5.0) -> DirectChannel:
        """Connect and show the token; raises OSError (or TimeoutError) if the replica's port
        cannot be reached."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port), timeout=timeout_s
        )
        writer.write(encode(address.token))
        return cls(reader, writer)

    async def call(self, method: str, args: list) -> Any:
        """The result of `method(*args)` on the replica; its error re-raised here as its class;
        `ChannelLost` if the connection breaks first."""
        if self.closed:
            raise ChannelLost("the direct channel is closed")
        call_id = self._next_id = self._next_id + 1
        future = self.loop.create_future()
        self._pending[call_id] = future
        try:
            self._writer.write(encode([call_id, method, args]))
            return await future
        except asyncio.CancelledError:
            if not self.closed:
                self._writer.write(encode([call_id]))
            raise
        finally:
            self._pending.pop(call_id, None)

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        error: Exception = ChannelLost("the replica closed the direct channel")
        try:
            while True:
                call_id, failed, payload = await read_frame(reader)
                future = self._pending.get(call_id)
                if future is None or future.done():
                    continue  # cancelled meanwhile
                if failed:
                    future.set_exception(error_from_wire(*payload))
                else:
                    future.set_result(payload)
        except (asyncio.IncompleteReadError, ConnectionError, InvalidRequest, ValueError) as e:
            error = ChannelLost(f"the direct channel broke: {e!r}")
        finally:
            self.closed = True
            self._writer.close()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
