"""The turn log: every segment a coordinator commits, every request's outcome and every
client feedback, as msgpack records in one append-only file that training actors read.

File format: a sequence of frames, each

    magic b"ATL1" | payload length (uint32 LE) | crc32 of payload (uint32 LE) | payload

where the payload is one msgpack map with a "kind" key ("turn", "request" or "feedback").
A frame that is cut short or fails its checksum ends the readable log: a reader stops there
(and picks up from the same offset later, when a writer may have completed it); a writer that
opens a file with a torn tail (a crash mid-append) truncates it before appending.

Durability: `TurnLogWriter.append` writes a batch with one write() and flushes it to the OS;
it calls fsync at most every `fsync_every_s` seconds (0: after every batch) and on close, so
a machine crash loses at most that window, a process crash loses nothing appended.

Reading, e.g. in a training actor that resumes where it stopped:

    reader = TurnLogReader(path, offset=saved_offset)
    for record, next_offset in reader:
        ...
        saved_offset = next_offset
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import msgpack

MAGIC = b"ATL1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a length above this is corruption, not a record

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class TurnRecord:
    """One committed segment: who wrote it, on whose decision, how long it took."""

    kind: ClassVar[str] = "turn"
    request_id: str
    turn: int  # index of the policy decision
    segment: int  # index of the segment in the response (a deferral turn makes two)
    policy: str  # policy name
    policy_version: str
    decision: dict[str, Scalar]  # the decision's kind and fields, e.g. {"kind": "write", ...}
    model: str  # writer
    segment_kind: str  # "write" | "deferred" | "search"
    token_ids: tuple[int, ...]  # in the writer's tokenizer
    text: str
    logprobs: tuple[float, ...]
    model_finish: str  # why the writer stopped: length | stop | eos | gate
    policy_ms: float  # time waiting for the decision
    model_ms: float  # time in model calls for this turn (sync, generate, score)
    # the turn all in, from asking the policy to its segments streamed out (so wall_ms -
    # model_ms is the turn's coordination: policy, state, streaming); 0 in older logs
    wall_ms: float = 0.0
    time: float = field(default_factory=time.time)  # unix seconds when committed


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """Written once per request, after its last turn record: the query and the outcome."""

    kind: ClassVar[str] = "request"
    request_id: str
    prompt: str
    models: tuple[str, ...]
    policy: str
    policy_version: str
    policy_params: dict[str, object]  # as the request gave them (JSON values)
    num_turns: int
    num_segments: int  # the request's turn records carry segment = 0 .. num_segments-1
    text: str  # the final response
    finish_reason: str | None  # None when the request failed
    error: str | None  # error class and message when it failed
    time: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """A client's reward for a request (POST /v1/feedback)."""

    kind: ClassVar[str] = "feedback"
    request_id: str
    reward: float
    comment: str = ""
    time: float = field(default_factory=time.time)


Record = TurnRecord | RequestRecord | FeedbackRecord
_KINDS: dict[str, type[Record]] = {c.kind: c for c in (TurnRecord, RequestRecord, FeedbackRecord)}


def encode_record(record: Record) -> bytes:
    """One frame: header + msgpack payload."""
    payload = msgpack.packb({"kind": record.kind, **asdict(record)}, use_bin_type=True)
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> Record:
    data = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
    cls = _KINDS[data.pop("kind")]
    return cls(**data)


def _read_frame(f, offset: int) -> tuple[Record, int] | None:
    """The record at `offset` and the offset after it, or None if no complete valid frame."""
    f.seek(offset)
    header = f.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    magic, length, crc = _HEADER.unpack(header)
    if magic != MAGIC or length > MAX_RECORD_BYTES:
        return None
    payload = f.read(length)
    if len(payload) < length or zlib.crc32(payload) != crc:
        return None
    try:
        record = decode_payload(payload)
    except (ValueError, KeyError, TypeError, msgpack.UnpackException):
        return None
    return record, offset + _HEADER.size + length


def read_records(path: str | Path, offset: int = 0) -> Iterator[tuple[Record, int]]:
    """Yield (record, offset after it) from `offset` up to the first incomplete/corrupt frame."""
    with open(path, "rb") as f:
        while True:
            got = _read_frame(f, offset)
            if got is None:
                return
            record, offset = got
            yield got


def last_good_offset(path: str | Path) -> int:
    """Offset just after the last complete, valid frame (0 for an empty or missing file)."""
    offset = 0
    if not os.path.exists(path):
        return 0
    for _, offset in read_records(path):  # noqa: B007  (we want the last offset)
        pass
    return offset


class TurnLogReader:
    """Iterates (record, next_offset) from `offset`; iterate again later to read new records."""

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset  # where the next iteration starts

    def __iter__(self) -> Iterator[tuple[Record, int]]:
        if not self.path.exists():
            return
        for record, nxt in read_records(self.path, self.offset):
            self.offset = nxt
            yield record, nxt


class TurnLogWriter:
    """Single writer of one log file (see the module docstring for the flush/fsync policy)."""

    def __init__(self, path: str | Path, fsync_every_s: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync_every_s = fsync_every_s
        good = last_good_offset(self.path)
        if self.path.exists() and self.path.stat().st_size > good:
            with open(self.path, "r+b") as f:  # drop a torn tail before appending after it
                f.truncate(good)
        self._file = open(self.path, "ab")
        self._last_fsync = time.monotonic()
        self.offset = good  # file size = offset after the last record written

    def append(self, records: Iterable[Record]) -> int:
        """Append a batch; return the offset after it."""
        data = b"".join(encode_record(r) for r in records)
        if data:
            self._file.write(data)
            self._file.flush()
            self.offset += len(data)
            if time.monotonic() - self._last_fsync >= self.fsync_every_s:
                self.sync()
        return self.offset

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> TurnLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TurnSink(Protocol):
    """Where a coordinator sends its records (a local file, or the turn log actor)."""

    async def write(self, records: list[Record]) -> None: ...


class FileTurnSink:
    """A `TurnSink` that appends to a local `TurnLogWriter` (one process, tests, benchmarks)."""

    def __init__(self, writer: TurnLogWriter) -> None:
        self.writer = writer

    async def write(self, records: list[Record]) -> None:
        self.writer.append(records)
