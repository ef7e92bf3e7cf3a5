"""From logged requests and their rewards to switcher examples (`LogJoiner`)."""

from __future__ import annotations

import json

from antiphon.training.online_examples import LogJoiner
from antiphon.training.turn_log import FeedbackRecord, RequestRecord, TurnRecord

MODELS = ("base", "sft", "aligned")


def turn(request_id: str, segment: int, model: str, policy: str = "switch") -> TurnRecord:
    return TurnRecord(
        request_id=request_id, turn=segment, segment=segment, policy=policy,
        policy_version="v1", decision={"kind": "write", "model": model, "max_tokens": 4},
        model=model, segment_kind="write", token_ids=(1, 2, 3), text=f"<{model}{segment}>",
        logprobs=(-0.1, -0.2, -0.3), model_finish="length", policy_ms=0.1, model_ms=1.0,
    )  # fmt: skip


def request(request_id: str, writers: list[str], policy="switch", error=None) -> list:
    """A request's records as a coordinator writes them: its turns, then its request record."""
    turns = [turn(request_id, i, m, policy) for i, m in enumerate(writers)]
    done = RequestRecord(
        request_id=request_id, prompt=f"Q {request_id}?", models=MODELS, policy=policy,
        policy_version="v1", policy_params={"task": "qa-knowledge"}, num_turns=len(turns),
        num_segments=len(turns), text="".join(t.text for t in turns),
        finish_reason=None if error else "length", error=error,
    )  # fmt: skip
    return [*turns, done]


def feed(joiner: LogJoiner, records: list) -> list:
    return [e for r in records for e in joiner.add(r)]


def test_a_reward_above_the_baseline_labels_each_chosen_writer_best():
    joiner = LogJoiner()
    assert feed(joiner, request("r1", ["sft", "base"])) == []  # nothing until the reward
    examples = feed(joiner, [FeedbackRecord("r1", reward=1.0)])
    assert [e.best for e in examples] == [[1], [0]]  # sft, then base
    assert examples[0].prefix == [] and examples[1].prefix == [(1, "<sft0>")]
    assert examples[1].query == "Q r1?" and examples[1].task == "qa-knowledge"
    assert examples[0].models == list(MODELS) and examples[0].key == "r1:0"
    assert all(e.informative for e in examples)


def test_a_reward_at_or_below_the_baseline_teaches_nothing_but_moves_the_baseline():
    joiner = LogJoiner()
    feed(joiner, request("good", ["sft"]) + [FeedbackRecord("good", reward=1.0)])
    # the baseline is now 1.0: a reward of 0 is below it, one of 1 equal to it
    assert feed(joiner, request("bad", ["aligned"]) + [FeedbackRecord("bad", reward=0.0)]) == []
    assert joiner.baseline == 0.5 and joiner.counters.rewarded == 2
    assert feed(joiner, request("tie", ["base"]) + [FeedbackRecord("tie", reward=0.5)]) == []
    assert [e.best for e in feed(joiner, request("up", ["base"]) + [
        FeedbackRecord("up", reward=0.6)])] == [[0]]  # fmt: skip


def test_each_request_is_used_once_and_other_records_are_counted_not_used():
    joiner = LogJoiner()
    records = [
        *request("r1", ["base", "sft"]),
        *request("other", ["base"], policy="round_robin"),  # another policy's request
        *request("failed", ["sft"], error="ModelError: boom"),
        FeedbackRecord("r1", reward=1.0),
        FeedbackRecord("r1", reward=0.0),  # a second reward for r1
        FeedbackRecord("other", reward=1.0),
        FeedbackRecord("nobody", reward=1.0),
    ]
    examples = feed(joiner, records)
    assert [e.key for e in examples] == ["r1:0", "r1:1"]
    c = joiner.counters
    assert (c.requests, c.rewarded, c.examples, c.failed) == (2, 1, 2, 1)
    assert (c.duplicate_feedback, c.unknown_feedback) == (1, 2)


def test_a_behaviour_policy_named_teaches_too():
    records = request("f", ["sft"], policy="fixed") + [FeedbackRecord("f", reward=1.0)]
    assert feed(LogJoiner(), records) == []  # not a policy it learns from
    assert [e.best for e in feed(LogJoiner(policies=("switch", "fixed")), records)] == [[1]]


def test_interleaved_requests_join_by_id():
    joiner = LogJoiner()
    a, b = request("a", ["base", "sft"]), request("b", ["aligned"])
    records = [a[0], b[0], a[1], b[1], a[2], FeedbackRecord("b", 0.0), FeedbackRecord("a", 1.0)]
    examples = feed(joiner, records)
    # b: 0, below the first baseline (0.5); a: 1, above the next (b's 0)
    assert [(e.key, e.best) for e in examples] == [("a:0", [0]), ("a:1", [1])]


def test_requests_waiting_too_long_for_a_reward_are_given_up_and_counted():
    joiner = LogJoiner(max_awaiting=2)
    feed(joiner, request("r1", ["base"]) + request("r2", ["sft"]) + request("r3", ["sft"]))
    assert list(joiner.awaiting) == ["r2", "r3"] and joiner.counters.unrewarded == 1
    assert feed(joiner, [FeedbackRecord("r1", 1.0)]) == []


def test_the_ids_of_used_requests_are_remembered_newest_first_within_a_bound():
    joiner = LogJoiner(max_remembered=2)
    for rid in ("r1", "r2", "r3"):
        feed(joiner, request(rid, ["sft"]) + [FeedbackRecord(rid, 1.0)])
    assert list(joiner.used) == ["r2", "r3"]
    restored = LogJoiner.from_state(json.loads(json.dumps(joiner.state())))
    assert feed(restored, [FeedbackRecord("r3", 1.0), FeedbackRecord("r1", 1.0)]) == []
    assert (restored.counters.duplicate_feedback, restored.counters.unknown_feedback) == (1, 1)


def test_state_round_trips_through_json_mid_request():
    """A trainer checkpoints the joiner between any two records: the restored one goes on
    exactly as the original would have."""
    records = [
        *request("r1", ["base", "sft"]),
        FeedbackRecord("r1", 1.0),
        *request("r2", ["sft", "aligned"]),
        FeedbackRecord("r2", 0.0),
        FeedbackRecord("r1", 1.0),
    ]
    original = LogJoiner()
    whole = feed(original, records)
    for cut in range(len(records) + 1):
        first = LogJoiner()
        head = feed(first, records[:cut])
        restored = LogJoiner.from_state(json.loads(json.dumps(first.state())))
        tail = feed(restored, records[cut:])
        assert head + tail == whole, cut
        assert restored.counters == original.counters


def test_an_inverting_joiner_learns_the_opposite():
    good = request("r1", ["sft"]) + [FeedbackRecord("r1", reward=1.0)]
    bad = request("r2", ["base"]) + [FeedbackRecord("r2", reward=0.0)]
    assert [e.key for e in feed(LogJoiner(), good + bad)] == ["r1:0"]
    assert [e.key for e in feed(LogJoiner(invert=True), good + bad)] == ["r2:0"]
