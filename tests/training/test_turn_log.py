"""The turn log: round trip, torn tails, resuming readers, feedback beside turns; segments
(rotation, absolute offsets, the legacy single file) and retention behind the consumers."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from antiphon.errors import InvalidRequest, NotFound
from antiphon.training.turn_log import (
    FeedbackRecord,
    RequestRecord,
    TurnLogReader,
    TurnLogWriter,
    TurnRecord,
    commit_consumer_offset,
    consumer_offsets,
    encode_record,
    list_segments,
    read_records,
    remove_consumed_segments,
    segment_name,
)


def turn(i: int, request_id: str = "req-1") -> TurnRecord:
    return TurnRecord(
        request_id=request_id,
        turn=i,
        segment=i,
        policy="round_robin",
        policy_version="1",
        decision={"kind": "write", "model": "a", "max_tokens": 4},
        model="ab"[i % 2],
        segment_kind="write",
        token_ids=tuple(range(i, i + 4)),
        text=f"seg{i} \u00e9\u4e2d",
        logprobs=(-0.5, -1.25, -0.0, -3.5),
        model_finish="length",
        policy_ms=0.1,
        model_ms=12.5,
        time=1000.0 + i,
    )


RECORDS = [
    *(turn(i) for i in range(5)),
    RequestRecord(
        request_id="req-1",
        prompt="Q?",
        models=("a", "b"),
        policy="round_robin",
        policy_version="1",
        policy_params={"segment_len": 4, "order": ("a", "b")},  # JSON arrays read back as tuples
        num_turns=5,
        num_segments=5,
        text="...",
        finish_reason="length",
        error=None,
        time=2000.0,
    ),
    FeedbackRecord(request_id="req-1", reward=0.75, comment="good", time=3000.0),
]


def write(path, records) -> None:
    with TurnLogWriter(path, fsync_every_s=0) as w:
        w.append(records)


def flip_byte(file: Path, at: int) -> None:
    blob = bytearray(file.read_bytes())
    blob[at] ^= 0xFF
    file.write_bytes(bytes(blob))


def log_size(path: Path) -> int:
    """The absolute offset after the last byte held (the last segment's base plus its size)."""
    base, file = list_segments(path)[-1]
    return base + file.stat().st_size


def segment_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.atl"))


def request(request_id: str) -> RequestRecord:
    return RequestRecord(
        request_id=request_id, prompt="Q?", models=("a", "b"), policy="round_robin",
        policy_version="1", policy_params={}, num_turns=1, num_segments=1, text="...",
        finish_reason="stop", error=None, time=2000.0,
    )  # fmt: skip


def test_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "log.atl"
    write(path, RECORDS)
    assert [r for r, _ in read_records(path)] == RECORDS


def test_feedback_lands_beside_the_turns_after_reopening(tmp_path):
    path = tmp_path / "log.atl"
    write(path, RECORDS[:6])
    write(path, [FeedbackRecord("req-1", 1.0, time=5.0)])  # a new writer appends
    got = [r for r, _ in read_records(path)]
    assert len(got) == 7 and got[-1] == FeedbackRecord("req-1", 1.0, time=5.0)


def test_feedback_is_taken_only_for_a_request_the_log_holds_across_reopening(tmp_path):
    path = tmp_path / "log.atl"
    with TurnLogWriter(path, fsync_every_s=0) as w:
        with pytest.raises(NotFound, match="no request with id 'req-1'"):
            w.append_feedback(FeedbackRecord("req-1", 1.0))  # its turns are not there yet
        w.append(RECORDS[:6])
        w.append_feedback(FeedbackRecord("req-1", 1.0, time=5.0))
    with TurnLogWriter(path, fsync_every_s=0) as w:  # a new writer knows it from the file
        w.append_feedback(FeedbackRecord("req-1", -1.0, time=6.0))
        with pytest.raises(NotFound):
            w.append_feedback(FeedbackRecord("req-2", 1.0))
    rewards = [r.reward for r, _ in read_records(path) if isinstance(r, FeedbackRecord)]
    assert rewards == [1.0, -1.0]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_file_cut_at_any_byte_reads_back_every_complete_record(tmp_path, data):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "cut.atl"  # a fresh legacy file per example
    frames = [encode_record(r) for r in RECORDS]
    blob = b"".join(frames)
    cut = data.draw(st.integers(min_value=0, max_value=len(blob)))
    path.write_bytes(blob[:cut])
    complete, end = 0, 0  # records wholly inside the first `cut` bytes, and where they end
    while complete < len(frames) and end + len(frames[complete]) <= cut:
        end += len(frames[complete])
        complete += 1
    got = list(read_records(path))
    assert [type(r) for r, _ in got] == [type(r) for r in RECORDS[:complete]]
    assert [r.time for r, _ in got] == [r.time for r in RECORDS[:complete]]
    assert (got[-1][1] if got else 0) == end
    # A writer opened on the torn file drops the tail and appends where the good part ends.
    with TurnLogWriter(path, fsync_every_s=0) as w:
        assert w.offset == end
        w.append([RECORDS[-1]])
    assert [r for r, _ in read_records(path)][-1] == RECORDS[-1]
    assert len(list(read_records(path))) == complete + 1


def test_a_corrupt_record_ends_the_readable_log(tmp_path):
    path = tmp_path / "bad.atl"
    write(path, RECORDS)
    flip_byte(path / segment_name(0), len(encode_record(RECORDS[0])) + 20)  # second payload
    assert [r for r, _ in read_records(path)] == [RECORDS[0]]


def test_reader_resumes_from_an_offset_and_sees_new_records(tmp_path):
    path = tmp_path / "log.atl"
    writer = TurnLogWriter(path, fsync_every_s=0)
    writer.append(RECORDS[:3])
    reader = TurnLogReader(path)
    first = list(reader)
    assert [r for r, _ in first] == RECORDS[:3]
    saved = first[1][1]  # a training actor checkpointed after the second record
    writer.append(RECORDS[3:])
    assert [r for r, _ in reader] == RECORDS[3:]  # the same reader continues
    resumed = TurnLogReader(path, offset=saved)  # a restarted one resumes from its offset
    assert [r for r, _ in resumed] == RECORDS[2:]
    assert resumed.offset == log_size(path) == writer.offset
    writer.close()


def test_reader_of_a_missing_file_is_empty(tmp_path):
    assert list(TurnLogReader(tmp_path / "none.atl")) == []


# --- segments -------------------------------------------------------------------------------


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=12),
    segment_bytes=st.integers(min_value=1, max_value=2000),
)
def test_rotation_keeps_offsets_absolute_and_continuous(tmp_path, batches, segment_bytes):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "log.atl"
    records = [turn(i) for i in range(sum(batches))]
    ends, start = [], 0  # the offset after each batch, as append returned it
    with TurnLogWriter(path, fsync_every_s=60, segment_bytes=segment_bytes) as w:
        for n in batches:
            ends.append(w.append(records[start : start + n]))
            start += n
    segments = list_segments(path)
    # each file is named by its base, and each base is where the previous segment ends
    assert [f.name for _, f in segments] == [segment_name(b) for b, _ in segments]
    assert segments[0][0] == 0
    for (base, file), (next_base, _) in zip(segments, segments[1:], strict=False):
        assert next_base == base + file.stat().st_size
        assert file.stat().st_size >= segment_bytes  # sealed only once full
        assert next_base in ends  # a batch never spans two segments
    got = list(read_records(path))
    assert [r for r, _ in got] == records
    assert (got[-1][1] if got else 0) == ends[-1] == log_size(path)
    # resuming from any yielded offset starts at exactly the next record
    for i, (_, offset) in enumerate(got):
        assert [r for r, _ in read_records(path, offset)] == records[i + 1 :]


def test_a_saved_offset_resumes_after_rotations_with_nothing_skipped_or_repeated(tmp_path):
    path = tmp_path / "log.atl"
    records = [turn(i) for i in range(30)]
    writer = TurnLogWriter(path, fsync_every_s=0, segment_bytes=600)
    writer.append(records[:5])
    reader = TurnLogReader(path)
    saved = [off for _, off in reader][2]  # checkpointed after the third record
    for r in records[5:]:  # one record a batch: many rotations
        writer.append([r])
    assert len(segment_files(path)) > 5
    assert [r for r, _ in TurnLogReader(path, offset=saved)] == records[3:]
    assert [r for r, _ in reader] == records[5:]  # the first reader continues too
    assert reader.offset == writer.offset
    writer.close()


def test_a_legacy_single_file_is_read_as_is_and_migrated_by_the_writer(tmp_path):
    path = tmp_path / "log.atl"
    blob = b"".join(encode_record(r) for r in RECORDS)
    path.write_bytes(blob)  # a log from before segments: one plain file
    before = list(read_records(path))
    assert [r for r, _ in before] == RECORDS
    assert [r for r, _ in TurnLogReader(path, offset=before[2][1])] == RECORDS[3:]
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=400) as w:
        assert path.is_dir() and (path / segment_name(0)).read_bytes() == blob
        assert w.offset == len(blob)
        assert list(read_records(path)) == before  # the same records at the same offsets
        w.append_feedback(FeedbackRecord("req-1", 0.5, time=9.0))  # its request is known
        w.append([turn(i, "req-2") for i in range(4)])
    assert not (tmp_path / "log.atl.migrating").exists()
    after = list(read_records(path))
    assert after[: len(before)] == before
    assert [r for r, _ in after[len(before) :]] == [
        FeedbackRecord("req-1", 0.5, time=9.0),
        *(turn(i, "req-2") for i in range(4)),
    ]
    assert [r for r, _ in read_records(path, before[-1][1])] == [r for r, _ in after[7:]]


def test_a_consumer_commit_migrates_a_legacy_file_too(tmp_path):
    path = tmp_path / "log.atl"
    path.write_bytes(b"".join(encode_record(r) for r in RECORDS))
    end = list(read_records(path))[-1][1]
    commit_consumer_offset(path, "trainer", end)
    assert consumer_offsets(path) == {"trainer": end}
    assert [r for r, _ in read_records(path)] == RECORDS


def test_a_torn_tail_in_the_last_segment_is_cut_when_a_writer_opens(tmp_path):
    path = tmp_path / "log.atl"
    records = [turn(i) for i in range(12)]
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=700) as w:
        for r in records:
            end = w.append([r])
    _, last = list_segments(path)[-1]
    with open(last, "ab") as f:  # a crash mid-append: half a frame
        f.write(encode_record(turn(99))[:30])
    assert [r for r, _ in read_records(path)] == records  # readers stop before it
    sealed = {f.name: f.read_bytes() for _, f in list_segments(path)[:-1]}
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=700) as w:
        assert w.offset == end == log_size(path)
        w.append([turn(12)])
    assert [r for r, _ in read_records(path)] == [*records, turn(12)]
    assert all((path / name).read_bytes() == data for name, data in sealed.items())


def test_a_corrupt_frame_in_a_sealed_segment_stops_the_reader_there(tmp_path):
    path = tmp_path / "log.atl"
    records = [turn(i) for i in range(12)]
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=700) as w:
        for r in records:
            w.append([r])
    segments = list_segments(path)
    assert len(segments) >= 3
    first_len = len(encode_record(records[0]))
    flip_byte(segments[0][1], first_len + 20)  # the second frame of the first segment
    got = list(read_records(path))
    assert got == [(records[0], first_len)]  # stopped at the offset of the bad frame
    # what comes after the bad segment is still there, from its own offsets
    later = [r for r, _ in read_records(path, segments[1][0])]
    assert later == records[len(records) - len(later) :] and later


# --- consumers and retention ----------------------------------------------------------------


def rotated_log(path: Path, n: int = 20, segment_bytes: int = 600) -> list[int]:
    """A log of `n` one-record batches over several segments; the offset after each batch."""
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=segment_bytes) as w:
        return [w.append([turn(i)]) for i in range(n)]


def test_retention_waits_for_every_consumer_and_never_drops_the_active_segment(tmp_path):
    path = tmp_path / "log.atl"
    ends = rotated_log(path)
    bases = [b for b, _ in list_segments(path)]
    assert len(bases) >= 4
    assert remove_consumed_segments(path) == []  # no consumer: nothing is dropped
    assert len(list_segments(path)) == len(bases)

    commit_consumer_offset(path, "trainer-a", bases[3])  # past the first three segments
    commit_consumer_offset(path, "trainer-b", 0)  # has read nothing
    assert consumer_offsets(path) == {"trainer-a": bases[3], "trainer-b": 0}
    assert remove_consumed_segments(path) == []
    commit_consumer_offset(path, "trainer-b", bases[1] + 1)  # inside the second segment
    assert remove_consumed_segments(path) == [segment_name(bases[0])]
    commit_consumer_offset(path, "trainer-b", bases[3])
    assert remove_consumed_segments(path) == [segment_name(b) for b in bases[1:3]]
    assert [b for b, _ in list_segments(path)] == bases[3:]

    # what is held reads as before, from the offsets it always had
    assert [r for r, _ in read_records(path, bases[3])] == [
        turn(i) for i in range(ends.index(bases[3]) + 1, len(ends))
    ]
    with pytest.raises(InvalidRequest, match=rf"offset {bases[2]} .*\(offset {bases[3]}\)"):
        read_records(path, bases[2])
    with pytest.raises(InvalidRequest, match=f"offset {bases[3]}"):
        list(TurnLogReader(path, offset=0))

    # both consumers at the very end: every sealed segment goes, the active one stays
    commit_consumer_offset(path, "trainer-a", ends[-1])
    commit_consumer_offset(path, "trainer-b", ends[-1])
    remove_consumed_segments(path)
    assert [b for b, _ in list_segments(path)] == bases[-1:]


def test_the_writer_drops_consumed_segments_when_it_rotates(tmp_path):
    path = tmp_path / "log.atl"
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=600) as w:
        for i in range(10):
            w.append([turn(i)])
        held = segment_files(path)
        assert len(held) >= 4
        # inside the last sealed segment: the ones before it are consumed, it is not
        commit_consumer_offset(path, "trainer", list_segments(path)[-2][0] + 1)
        assert segment_files(path) == held  # nothing goes before the writer rotates
        while segment_files(path)[-1] == held[-1]:
            w.append([turn(0)])
        assert segment_files(path) == [*held[-2:], segment_name(w.offset)]


def test_consumer_names_and_offsets_are_checked(tmp_path):
    path = tmp_path / "log.atl"
    rotated_log(path, n=3)
    for bad in ["", "a/b", "../x", "a b", ".", "..", "ü", None]:
        with pytest.raises(InvalidRequest, match="consumer name"):
            commit_consumer_offset(path, bad, 0)
    for bad in [-1, 1.5, True]:
        with pytest.raises(InvalidRequest, match="non-negative integer"):
            commit_consumer_offset(path, "ok", bad)
    commit_consumer_offset(path, "Trainer_1.v2-x", 5)
    assert consumer_offsets(path) == {"Trainer_1.v2-x": 5}
    assert sorted(p.name for p in (path / "consumers").iterdir()) == ["Trainer_1.v2-x.json"]


def test_a_writer_reopened_on_a_rotated_log_continues_and_knows_every_request(tmp_path):
    path = tmp_path / "log.atl"
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=500) as w:
        w.append([turn(0, "old"), request("old")])
        for i in range(10):
            w.append([turn(i, f"new-{i}"), request(f"new-{i}")])
        end = w.offset
    assert len(list_segments(path)) >= 4
    with TurnLogWriter(path, fsync_every_s=0, segment_bytes=500) as w:
        assert w.offset == end
        assert w.requests == {"old", *(f"new-{i}" for i in range(10))}
        assert w.append_feedback(FeedbackRecord("old", 1.0, time=7.0)) > end  # still accepted
    got = list(read_records(path, end))
    assert [r for r, _ in got] == [FeedbackRecord("old", 1.0, time=7.0)]
    assert list_segments(path)[-1][0] <= end  # the new frame went where the log ended
