"""The turn log file: round trip, torn tails, resuming readers, feedback beside turns."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from antiphon.errors import NotFound
from antiphon.training.turn_log import (
    FeedbackRecord,
    RequestRecord,
    TurnLogReader,
    TurnLogWriter,
    TurnRecord,
    encode_record,
    read_records,
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
    path = tmp_path / "cut.atl"
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
    blob = bytearray(path.read_bytes())
    second = len(encode_record(RECORDS[0]))
    blob[second + 20] ^= 0xFF  # a flipped byte inside the second record's payload
    path.write_bytes(bytes(blob))
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
    assert resumed.offset == os.path.getsize(path) == writer.offset
    writer.close()


def test_reader_of_a_missing_file_is_empty(tmp_path):
    assert list(TurnLogReader(tmp_path / "none.atl")) == []
