"""The commit rules: what a turn's outcome does to the sequence, and what can be streamed.
Pure functions of frozen values, tested with hand-made segments and no model.

    state = apply(state, Outcome(segments=(seg,)), trim)    # the turn's third call
    events, released = release(state, released)              # what may go out now

`apply` appends the outcome's segments in order and ends the sequence on the first rule that
fires: a stop string in the response (the response is cut before it, even when it spans
segments), a segment that ended with its writer's end token (unless the outcome says an end
token ends only its segment), a stop string the engine matched inside a segment, or the
spent budget; then the outcome's own finish (a full context, a policy's Finish).

`release` holds back the segments that a stop string could still cut: while the response
ends with the start of a stop string, the segments holding that start wait for the next turn.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from antiphon.coordinator.request import SegmentEvent
from antiphon.sequence import Segment, SequenceFinishReason, SequenceState

# A segment cut to its first n characters and the tokens that make them.
Trim = Callable[[Segment, int], Segment]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What running one decision produced: segments to commit in order, and how it ended."""

    segments: tuple[Segment, ...] = ()
    finish: SequenceFinishReason | None = None  # the executor ends the sequence after them
    end_on_eos: bool = True  # False: a writer's end token ends only its segment

    def then(self, other: Outcome) -> Outcome:
        """This outcome followed by another (e.g. a search settled, then the next decision)."""
        return Outcome(self.segments + other.segments, other.finish, other.end_on_eos)


def apply(state: SequenceState, outcome: Outcome, trim: Trim) -> SequenceState:
    """The state after committing an outcome (a done state is returned as it is)."""
    for seg in outcome.segments:
        if state.done:
            return state
        state = _append(state, seg, outcome.end_on_eos, trim)
    if outcome.finish is not None:
        state = state.finished(outcome.finish)
    return state


def _append(state: SequenceState, seg: Segment, end_on_eos: bool, trim: Trim) -> SequenceState:
    before = len(state.text)
    state = replace(state, segments=state.segments + (seg,))
    if state.stop:
        cut = cut_at_stop(state, before, trim)
        if cut is not None:
            return cut.finished("stop")
    if seg.model_finish == "eos" and end_on_eos:
        return state.finished("eos")
    if seg.model_finish == "stop":  # the engine matched a stop string inside the segment
        return state.finished("stop")
    if state.tokens_left == 0:
        return state.finished("length")
    return state


def cut_at_stop(state: SequenceState, search_from: int, trim: Trim) -> SequenceState | None:
    """The state cut before the first stop string that starts at or after `search_from`
    (less a stop string's length: it may begin in earlier text), or None if there is none."""
    text = state.text
    start = max(0, search_from - max(len(s) for s in state.stop) + 1)
    hits = [p for p in (text.find(s, start) for s in state.stop) if p >= 0]
    if not hits:
        return None
    cut = min(hits)
    kept: list[Segment] = []
    offset = 0
    for seg in state.segments:
        if offset + len(seg.text) <= cut:
            kept.append(seg)
        elif offset < cut:
            kept.append(trim(seg, cut - offset))
        offset += len(seg.text)
    return replace(state, segments=tuple(kept))


def release(state: SequenceState, released: int) -> tuple[list[SegmentEvent], int]:
    """Events for the committed segments after the first `released` that can no longer
    change, and the new count of released segments."""
    segments = state.segments
    held = 0
    if not state.done and state.stop:
        text = state.text
        held = max(
            (m for s in state.stop for m in range(1, len(s)) if text.endswith(s[:m])),
            default=0,
        )
    limit = len(state.text) - held
    end = sum(len(s.text) for s in segments[:released])
    upto = released
    while upto < len(segments) and end + len(segments[upto].text) <= limit:
        end += len(segments[upto].text)
        upto += 1
    events = [
        SegmentEvent(request_id=state.request_id, index=i, segment=seg)
        for i, seg in enumerate(segments[released:upto], start=released)
    ]
    return events, upto


def tokenizer_trim(tokenizers: Mapping[str, Any]) -> Trim:
    """A `Trim` that decodes each writer's tokens with its own tokenizer: the cut segment
    keeps the fewest tokens whose text covers the kept characters."""

    def trim(seg: Segment, n_chars: int) -> Segment:
        tokenizer = tokenizers[seg.model]
        k = len(seg.token_ids)
        for i in range(1, len(seg.token_ids) + 1):
            text = tokenizer.decode(list(seg.token_ids[:i]), skip_special_tokens=True)
            if len(text) >= n_chars:
                k = i
                break
        return replace(
            seg,
            token_ids=seg.token_ids[:k],
            text=seg.text[:n_chars],
            logprobs=seg.logprobs[:k],
            gates=seg.gates[:k],
            top_logprobs=seg.top_logprobs[:k],
        )

    return trim
