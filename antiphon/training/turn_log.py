"""The turn log: every segment a coordinator commits, every request's outcome and every
client feedback (the records of `antiphon.coordinator.records`), as msgpack records in one
append-only file that training actors read.

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
from dataclasses import asdict
from pathlib import Path

import msgpack

from antiphon.coordinator.records import FeedbackRecord, Record, RequestRecord, TurnRecord
from antiphon.errors import NotFound

MAGIC = b"ATL1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a length above this is corruption, not a record

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
        # One pass over what is there: where the last whole frame ends, and which requests
        # the log holds (feedback is only taken for those).
        good = 0
        self.requests: set[str] = set()  # ids with a request record (finished or failed)
        for record, good in TurnLogReader(self.path):  # noqa: B007  (the last offset is kept)
            if isinstance(record, RequestRecord):
                self.requests.add(record.request_id)
        if self.path.exists() and self.path.stat().st_size > good:
            with open(self.path, "r+b") as f:  # drop a torn tail before appending after it
                f.truncate(good)
        self._file = open(self.path, "ab")
        self._last_fsync = time.monotonic()
        self.offset = good  # file size = offset after the last record written

    def append(self, records: Iterable[Record]) -> int:
        """Append a batch; return the offset after it."""
        records = list(records)
        data = b"".join(encode_record(r) for r in records)
        if data:
            self._file.write(data)
            self._file.flush()
            self.offset += len(data)
            if time.monotonic() - self._last_fsync >= self.fsync_every_s:
                self.sync()
            self.requests.update(r.request_id for r in records if isinstance(r, RequestRecord))
        return self.offset

    def append_feedback(self, record: FeedbackRecord) -> int:
        """Append a client's feedback for a request the log holds; NotFound for any other
        (a reward for no turns would train on nothing, and the client should hear so)."""
        if record.request_id not in self.requests:
            raise NotFound(
                f"no request with id {record.request_id!r} in the turn log (a request's "
                "records land just after its answer: feedback sent before then can be retried)"
            )
        return self.append([record])

    @property
    def closed(self) -> bool:
        return self._file.closed

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


class FileTurnSink:
    """A `TurnSink` that appends to a local `TurnLogWriter` (one process, tests, benchmarks)."""

    def __init__(self, writer: TurnLogWriter) -> None:
        self.writer = writer

    async def write(self, records: list[Record]) -> None:
        self.writer.append(records)

    async def feedback(self, record: FeedbackRecord) -> None:
        self.writer.append_feedback(record)

    async def flush(self) -> None:
        """Nothing to wait for: `write` appended the batch to the file already."""

    async def problem(self) -> str | None:
        return "the turn log file is closed" if self.writer.closed else None


__all__ = [
    "FeedbackRecord",
    "FileTurnSink",
    "Record",
    "RequestRecord",
    "TurnLogReader",
    "TurnLogWriter",
    "TurnRecord",
    "read_records",
]
