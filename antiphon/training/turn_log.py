"""The turn log: every segment a coordinator commits, every request's outcome and every
client feedback (the records of `antiphon.coordinator.records`), as msgpack records in an
append-only log that training actors read.

Layout: the log at `path` is a directory of segment files plus the consumers' offsets,

    path/00000000000000000000.atl     segment files, each named by its base: the absolute
    path/00000000000001048712.atl     log offset of its first byte (20 digits, zero-padded)
    path/consumers/<consumer>.json    {"offset": N}: how far each consumer has processed

Offsets are absolute and continuous across segments (a segment's base is the previous base
plus the previous segment's size), so an offset saved by a reader stays valid whatever
rotation happens later. An older single-file log (a regular file at `path`) reads as one
segment with base 0; a writer (or a consumer's first commit) moves it into the directory
layout as segment 00000000000000000000.atl, so its records keep their offsets.

Segment format: a sequence of frames, each

    magic b"ATL1" | payload length (uint32 LE) | crc32 of payload (uint32 LE) | payload

where the payload is one msgpack map with a "kind" key ("turn", "request" or "feedback").
A frame never spans two segments. A frame that is cut short or fails its checksum ends the
readable log: a reader stops there (and picks up from the same offset later, when a writer
may have completed it); a writer that opens a log whose last segment has a torn tail (a crash
mid-append) truncates it before appending. Sealed segments are never written again.

Rotation: once a batch leaves the active segment at `segment_bytes` or more, the writer fsyncs
and closes it and starts a new segment at the current offset.

Retention: a consumer (a training actor) commits how far it has durably processed with
`commit_consumer_offset`; after each rotation the writer deletes every sealed segment that
ends at or before the lowest committed offset (`remove_consumed_segments`). With no consumer
registered nothing is deleted. Reading from an offset whose segment is gone raises
`InvalidRequest`.

Durability: `TurnLogWriter.append` writes a batch with one write() and flushes it to the OS;
it calls fsync at most every `fsync_every_s` seconds (0: after every batch), on rotation and
on close, so a machine crash loses at most that window, a process crash loses nothing appended.

Reading, e.g. in a training actor that resumes where it stopped:

    reader = TurnLogReader(path, offset=saved_offset)
    for record, next_offset in reader:
        ...
        saved_offset = next_offset
    save_my_state(saved_offset)                            # durably, first
    commit_consumer_offset(path, "switch-trainer", saved_offset)  # then let the log drop it
"""

from __future__ import annotations

import bisect
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import msgpack
import structlog

from antiphon.coordinator.records import FeedbackRecord, Record, RequestRecord, TurnRecord
from antiphon.errors import InvalidRequest, NotFound
from antiphon.training.durable import fsync_dir, write_json_atomic

log = structlog.get_logger(__name__)

MAGIC = b"ATL1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a length above this is corruption, not a record
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024

SEGMENT_SUFFIX = ".atl"
_SEGMENT_NAME = re.compile(r"[0-9]{20}\.atl")
CONSUMERS_DIR = "consumers"
_CONSUMER_NAME = re.compile(r"[A-Za-z0-9_.-]+")

_KINDS: dict[str, type[Record]] = {c.kind: c for c in (TurnRecord, RequestRecord, FeedbackRecord)}

# One segment: (base, file). Lists of them are ordered by base, oldest first.
Segment = tuple[int, Path]


# --- frames ---------------------------------------------------------------------------------


def encode_record(record: Record) -> bytes:
    """One frame: header + msgpack payload."""
    payload = msgpack.packb({"kind": record.kind, **asdict(record)}, use_bin_type=True)
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> Record:
    """The record a frame's payload holds."""
    data = msgpack.unpackb(payload, raw=False, use_list=False, strict_map_key=False)
    cls = _KINDS[data.pop("kind")]
    return cls(**data)


def _read_frame(f, offset: int) -> tuple[Record, int] | None:
    """The record at `offset` in open file `f` and the offset after it, or None if there is
    no complete valid frame there."""
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


# --- segments -------------------------------------------------------------------------------


def segment_name(base: int) -> str:
    """The file name of the segment whose first byte is at absolute offset `base`."""
    return f"{base:020d}{SEGMENT_SUFFIX}"


def list_segments(path: str | Path) -> list[Segment]:
    """The log's segments, oldest first: a legacy single file is one segment at base 0, a
    missing path has none. Other files in the directory (consumers, temp files) are ignored."""
    path = Path(path)
    if path.is_file():
        return [(0, path)]
    if not path.is_dir():
        return []
    found = [
        (int(entry.name[: -len(SEGMENT_SUFFIX)]), entry)
        for entry in path.iterdir()
        if _SEGMENT_NAME.fullmatch(entry.name)
    ]
    return sorted(found)


def _scan_segment(
    segment: Segment, offset: int, end: int | None = None
) -> Iterator[tuple[Record, int]]:
    """Yield (record, absolute offset after it) from absolute `offset` within one segment, up
    to the first incomplete/corrupt frame or to `end` (a sealed segment's end, the next base;
    a frame that would cross it is corruption, never yielded)."""
    base, file = segment
    try:
        f = open(file, "rb")
    except FileNotFoundError:  # listed, then removed by retention before we got to it
        raise InvalidRequest(
            f"offset {offset} is no longer held: segment {file} was removed while being read"
        ) from None
    with f:
        while end is None or offset < end:
            got = _read_frame(f, offset - base)
            if got is None:
                return
            record, nxt = got
            offset = base + nxt
            if end is not None and offset > end:
                return
            yield record, offset


def _segment_at(segments: list[Segment], offset: int, path: Path) -> int:
    """Index of the segment holding absolute `offset` (the one with the largest base <= it);
    InvalidRequest if retention removed the records there."""
    oldest = segments[0][0]
    if offset < oldest:
        raise InvalidRequest(
            f"offset {offset} is before the oldest record the turn log at {path} still holds "
            f"(offset {oldest}): the segments before it were removed once every consumer had "
            "committed past them"
        )
    return bisect.bisect_right([base for base, _ in segments], offset) - 1


def read_records(path: str | Path, offset: int = 0) -> Iterator[tuple[Record, int]]:
    """Yield (record, absolute offset after it) from absolute `offset` up to the first
    incomplete/corrupt frame, across segments. Raises InvalidRequest (now, not on iteration)
    if `offset` is below the oldest segment still held; a missing log yields nothing."""
    path = Path(path)
    segments = list_segments(path)
    if not segments:
        return iter(())
    return _read_from(segments, _segment_at(segments, offset, path), offset)


def _read_from(segments: list[Segment], first: int, offset: int) -> Iterator[tuple[Record, int]]:
    """The records of `segments[first:]` from `offset`: a sealed segment read to its exact end
    continues into the next one, a frame cut short or corrupt stops everything."""
    for i in range(first, len(segments)):
        end = segments[i + 1][0] if i + 1 < len(segments) else None
        for record, nxt in _scan_segment(segments[i], offset, end):
            offset = nxt
            yield record, nxt
        if end is None or offset != end:
            return


class TurnLogReader:
    """Iterates (record, next_offset) from `offset`; iterate again later to read new records
    (new segments included: the directory is listed afresh each time)."""

    def __init__(self, path: str | Path, offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset  # absolute offset where the next iteration starts

    def __iter__(self) -> Iterator[tuple[Record, int]]:
        for record, nxt in read_records(self.path, self.offset):
            self.offset = nxt
            yield record, nxt


# --- the directory: legacy migration, durability --------------------------------------------


def _ensure_directory(path: Path) -> None:
    """Make `path` a segment directory: create it if missing; if it is a legacy single-file
    log, move that file in as the segment at base 0 (so its records keep their offsets).

    The file is first renamed aside (`<name>.migrating`), then moved in once the directory
    exists; a crash between the two steps is finished on the next call."""
    aside = path.with_name(path.name + ".migrating")
    if path.is_file():
        os.rename(path, aside)
    path.mkdir(parents=True, exist_ok=True)
    if aside.exists():
        first = path / segment_name(0)
        if first.exists():  # never overwrite a segment: leave the stray file to a person
            raise InvalidRequest(f"{aside} is left from a migration but {first} exists")
        os.rename(aside, first)
        fsync_dir(path)
        fsync_dir(path.parent)
        log.info("turn_log_migrated", path=str(path))


# --- consumers and retention ----------------------------------------------------------------


def _check_consumer(consumer: str) -> None:
    """InvalidRequest unless `consumer` is a safe file name stem."""
    if not isinstance(consumer, str) or not _CONSUMER_NAME.fullmatch(consumer):
        raise InvalidRequest(
            f"consumer name {consumer!r} is invalid: use one or more of A-Z a-z 0-9 _ . -"
        )
    if consumer in (".", ".."):  # allowed by the pattern, but not a file name
        raise InvalidRequest(f"consumer name {consumer!r} is invalid")


def commit_consumer_offset(path: str | Path, consumer: str, offset: int) -> None:
    """Record that `consumer` has durably processed the log up to absolute `offset`, so that
    retention may drop what comes before it. Atomic (temp file, fsync, rename): a crash leaves
    the old offset or the new one. A legacy single-file log is migrated first."""
    _check_consumer(consumer)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidRequest(f"consumer offset must be a non-negative integer, not {offset!r}")
    path = Path(path)
    _ensure_directory(path)
    consumers = path / CONSUMERS_DIR
    consumers.mkdir(exist_ok=True)
    # a temp name never ends in .json, so `consumer_offsets` never reads a half-written one
    write_json_atomic(consumers / f"{consumer}.json", {"offset": offset})


def consumer_offsets(path: str | Path) -> dict[str, int]:
    """Each registered consumer's committed offset (empty if none has committed)."""
    consumers = Path(path) / CONSUMERS_DIR
    if not consumers.is_dir():
        return {}
    offsets = {}
    for entry in consumers.glob("*.json"):
        # Unreadable is an error, not "absent": skipping it could drop segments it still needs
        offsets[entry.stem] = int(json.loads(entry.read_text())["offset"])
    return offsets


def remove_consumed_segments(path: str | Path) -> list[str]:
    """Delete every sealed segment that ends (where the next one begins) at or before the
    lowest committed consumer offset; return their file names, oldest first. Removes nothing
    with no consumer registered, and never the last (active) segment."""
    offsets = consumer_offsets(path)
    if not offsets:
        return []
    low = min(offsets.values())
    segments = list_segments(path)
    removed = []
    # oldest first, stopping at the first one still needed: what is held stays contiguous
    for (_, file), (next_base, _) in zip(segments, segments[1:], strict=False):
        if next_base > low:
            break
        file.unlink(missing_ok=True)  # another process's retention may have been first
        removed.append(file.name)
    return removed


# --- the writer -----------------------------------------------------------------------------


def _requests_in(segments: list[Segment]) -> set[str]:
    """The request ids of every request record in `segments`, each scanned on its own (a
    corrupt frame in one hides only the rest of that one)."""
    requests = set()
    for i, segment in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else None
        for record, _ in _scan_segment(segment, segment[0], end):
            if isinstance(record, RequestRecord):
                requests.add(record.request_id)
    return requests


def _truncate_torn_tail(segment: Segment) -> int:
    """Cut the last segment after its last whole frame (a crash mid-append leaves a torn
    one); return the absolute offset where it now ends."""
    base, file = segment
    good = base
    for _, good in _scan_segment(segment, base):  # noqa: B007  (the last offset is kept)
        pass
    if file.stat().st_size > good - base:
        with open(file, "r+b") as f:
            f.truncate(good - base)
    return good


class TurnLogWriter:
    """Single writer of one log (see the module docstring for the format, the fsync policy,
    rotation and retention). `offset` is the absolute offset after the last record written;
    `requests` the ids of every request record in the segments held."""

    def __init__(
        self,
        path: str | Path,
        fsync_every_s: float = 1.0,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if segment_bytes < 1:
            raise InvalidRequest(f"segment_bytes must be at least 1, not {segment_bytes}")
        self.path = Path(path)
        self.fsync_every_s = fsync_every_s
        self.segment_bytes = segment_bytes
        _ensure_directory(self.path)
        segments = list_segments(self.path)
        self.requests: set[str] = _requests_in(segments)  # feedback is only taken for those
        if segments:
            self._base, last = segments[-1]
            self.offset = _truncate_torn_tail((self._base, last))
        else:
            self._base = self.offset = 0
        self._open_segment()

    def _open_segment(self) -> None:
        """Open (creating it if new) the active segment, the one at `self._base`."""
        file = self.path / segment_name(self._base)
        created = not file.exists()
        self._file = open(file, "ab")
        if created:
            fsync_dir(self.path)
        self._last_fsync = time.monotonic()

    def append(self, records: Iterable[Record]) -> int:
        """Append a batch (to one segment, whole); return the absolute offset after it."""
        records = list(records)
        data = b"".join(encode_record(r) for r in records)
        if data:
            self._file.write(data)
            self._file.flush()
            self.offset += len(data)
            self.requests.update(r.request_id for r in records if isinstance(r, RequestRecord))
            if self.offset - self._base >= self.segment_bytes:
                self._rotate()
            elif time.monotonic() - self._last_fsync >= self.fsync_every_s:
                self.sync()
        return self.offset

    def _rotate(self) -> None:
        """Seal the active segment (fsync, close), start the next at the current offset, and
        drop the segments every consumer is past."""
        self.close()
        self._base = self.offset
        self._open_segment()
        try:
            removed = remove_consumed_segments(self.path)
        except (OSError, ValueError, KeyError) as e:
            # the batch is written: retention failing must not fail the append (a retried
            # append would write it twice); the next rotation tries again
            log.warning("turn_log_retention_failed", path=str(self.path), error=repr(e))
        else:
            if removed:
                log.info("turn_log_segments_removed", path=str(self.path), segments=removed)

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
        """Flush and fsync the active segment."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_fsync = time.monotonic()

    def close(self) -> None:
        """fsync and close the active segment (idempotent)."""
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
    "DEFAULT_SEGMENT_BYTES",
    "MAGIC",
    "FeedbackRecord",
    "FileTurnSink",
    "Record",
    "RequestRecord",
    "TurnLogReader",
    "TurnLogWriter",
    "TurnRecord",
    "commit_consumer_offset",
    "consumer_offsets",
    "decode_payload",
    "encode_record",
    "list_segments",
    "read_records",
    "remove_consumed_segments",
    "segment_name",
]
