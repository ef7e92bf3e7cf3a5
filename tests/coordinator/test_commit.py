"""The commit rules with hand-made segments: no model, no tokenizer, no event loop.

pytest tests/coordinator/test_commit.py -q
"""

from __future__ import annotations

from antiphon.coordinator.commit import Outcome, apply, release
from tests.factories import char_trim, make_segment, make_state


def commit(state, *segments, **outcome):
    return apply(state, Outcome(segments=segments, **outcome), char_trim)


def test_segments_are_appended_in_order_while_the_budget_lasts():
    state = commit(make_state(max_tokens=10), make_segment("abc"), make_segment("de", "b"))
    assert [s.text for s in state.segments] == ["abc", "de"]
    assert state.text == "abcde" and not state.done and state.tokens_left == 5


def test_the_spent_budget_ends_the_sequence_with_length():
    state = commit(make_state(max_tokens=5), make_segment("abc"), make_segment("de", "b"))
    assert state.done and state.finish_reason == "length"


def test_an_end_token_ends_the_sequence_unless_it_ends_only_its_segment():
    eos = make_segment("ab", model_finish="eos")
    assert commit(make_state(), eos).finish_reason == "eos"
    kept = commit(make_state(), eos, end_on_eos=False)
    assert not kept.done and kept.text == "ab"


def test_a_stop_string_the_engine_matched_ends_with_stop():
    state = commit(make_state(), make_segment("ab", model_finish="stop"))
    assert state.finish_reason == "stop" and state.text == "ab"


def test_a_stop_string_inside_a_segment_cuts_it_and_its_tokens():
    state = commit(make_state(stop=("END",)), make_segment("abENDcd"))
    assert state.finish_reason == "stop"
    (seg,) = state.segments
    assert seg.text == "ab" and len(seg.token_ids) == 2 and len(seg.logprobs) == 2


def test_a_stop_string_across_segments_cuts_the_earlier_one_and_drops_the_later():
    state = commit(make_state(stop=("END",)), make_segment("xyE"))
    assert not state.done  # "E" may start the stop string: nothing to cut yet
    state = commit(state, make_segment("NDzz", "b"))
    assert state.finish_reason == "stop"
    assert [(s.model, s.text) for s in state.segments] == [("a", "xy")]


def test_the_first_stop_rule_wins_and_later_segments_are_not_committed():
    state = commit(make_state(), make_segment("ab", model_finish="eos"), make_segment("cd", "b"))
    assert state.text == "ab" and state.finish_reason == "eos"


def test_the_outcomes_own_finish_comes_after_its_segments():
    state = commit(make_state(), make_segment("ab"), finish="length")
    assert state.text == "ab" and state.finish_reason == "length"
    assert commit(make_state(), finish="policy").finish_reason == "policy"
    assert (
        commit(make_state(), make_segment("ab", model_finish="eos"), finish="policy").finish_reason
        == "eos"
    )


def test_a_finished_state_is_left_as_it_is():
    done = commit(make_state(), make_segment("ab"), finish="policy")
    assert commit(done, make_segment("more")) == done


def test_release_streams_what_no_stop_string_can_still_cut():
    state = commit(make_state(stop=("STOP",)), make_segment("hello "), make_segment("S", "b"))
    events, released = release(state, 0)
    assert [e.text for e in events] == ["hello "] and released == 1  # "S" may begin "STOP"
    state = commit(state, make_segment("ay", "a"))
    events, released = release(state, released)
    assert [(e.index, e.model, e.text) for e in events] == [(1, "b", "S"), (2, "a", "ay")]


def test_release_lets_everything_out_once_the_sequence_is_done():
    state = commit(make_state(stop=("STOP",)), make_segment("aST"), finish="policy")
    events, released = release(state, 0)
    assert [e.text for e in events] == ["aST"] and released == 1
    assert release(state, released) == ([], 1)
