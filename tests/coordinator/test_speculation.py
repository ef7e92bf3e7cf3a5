"""Speculative continuation (`WriteSegment.speculate`): while the policy decides, the last
writer drafts the next segment; the draft is kept when the policy chooses that writer again
and cut off its session otherwise. Real engines (tiny checkpoints), no Ray.

    pytest tests/coordinator/test_speculation.py -q
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from antiphon.coordinator.executors.speculate import Draft
from antiphon.coordinator.loop import Coordinator
from antiphon.policies.base import Decision, Finish, WriteSegment
from antiphon.policies.switcher import Switch, SwitchParams
from antiphon.sequence import SequenceState, SequenceView
from tests.coordinator.conftest import live_sessions
from tests.factories import make_request

# stay, switch, switch to another tokenizer, come back, stay: every way a draft is kept or cut
WRITERS = ("a", "a", "b", "c", "a", "a", "d", "d")


class Script:
    """Writes with the given models in turn; `slow`: each decision awaits an event loop turn
    per call, as a policy that calls a model would."""

    name = "script"
    version = "v1"

    def __init__(self, writers, segment_len: int, speculate: bool, *, end_on_eos=True) -> None:
        self.writers, self.segment_len = writers, segment_len
        self.speculate, self.end_on_eos = speculate, end_on_eos

    async def decide(self, view: SequenceView) -> Decision:
        await asyncio.sleep(0)
        if view.turn >= len(self.writers):
            return Finish()
        return WriteSegment(self.writers[view.turn], self.segment_len,
                            end_on_eos=self.end_on_eos, speculate=self.speculate)  # fmt: skip


def run(engines, tokenizers, policy, **request):
    coord = Coordinator(engines, tokenizers, resolve_policy=lambda *_: policy)
    request = {"models": ("a", "b", "c", "d"), "max_tokens": 60, **request}
    return asyncio.run(coord.generate(make_request(**request)))


def written(result) -> list[tuple]:
    return [(s.model, s.token_ids, s.text, s.turn) for s in result.segments]


def logprobs(result) -> list[float]:
    return [lp for s in result.segments for lp in s.logprobs]


@pytest.mark.parametrize(
    "request_fields",
    [
        {},  # greedy
        {"temperature": 1.0, "seed": 11},  # sampled: the draft takes the turn's own seed
        {"temperature": 1.0, "seed": 5, "stop": ["e "]},  # a stop string may end it early
        {"max_tokens": 21},  # the budget cuts the last segment
    ],
)
def test_a_response_is_the_same_with_speculation_on_or_off(engines, tokenizers, request_fields):
    off = run(engines, tokenizers, Script(WRITERS, 7, speculate=False), **request_fields)
    on = run(engines, tokenizers, Script(WRITERS, 7, speculate=True), **request_fields)
    assert written(on) == written(off)
    # (a cache reused from another session may change the last bits: not the tokens)
    assert logprobs(on) == pytest.approx(logprobs(off), abs=1e-4)
    assert on.finish_reason == off.finish_reason
    assert len({s.model for s in off.segments}) > 1  # it switched writers
    assert live_sessions(engines) == 0  # drafts cut off or taken, every session closed


def test_the_same_when_an_end_token_ends_only_the_segment(engines, tokenizers):
    off = run(engines, tokenizers, Script(WRITERS, 9, speculate=False, end_on_eos=False))
    on = run(engines, tokenizers, Script(WRITERS, 9, speculate=True, end_on_eos=False))
    assert written(on) == written(off)


class Calls:
    """An engine whose generate calls are written down, in order, in a shared list."""

    def __init__(self, engine, name: str, events: list) -> None:
        self.engine, self.name, self.events = engine, name, events

    def __getattr__(self, attr: str):
        return getattr(self.engine, attr)

    async def generate(self, *args, **kwargs):
        self.events.append(("generate", self.name))
        return await self.engine.generate(*args, **kwargs)


class Watching(Script):
    """A policy that, deciding turn t > 0, waits for the last writer to have made more
    generate calls than it wrote segments: the one more is a draft, made while the policy
    decides. (No draft of that writer has been cut off before: the script switches once.)"""

    def __init__(self, events: list, writers, segment_len) -> None:
        super().__init__(writers, segment_len, speculate=True)
        self.events, self.drafted = events, []

    async def decide(self, view: SequenceView) -> Decision:
        if view.turn > 0:
            writer = view.segments[-1].model
            wrote = sum(s.model == writer for s in view.segments)
            for _ in range(1000):
                if self.events.count(("generate", writer)) > wrote:
                    self.drafted.append(view.turn)
                    break
                await asyncio.sleep(0.005)
        return await super().decide(view)


def test_the_writer_drafts_while_the_policy_decides(engines, tokenizers):
    events: list = []
    watched = {name: Calls(engine, name, events) for name, engine in engines.items()}
    policy = Watching(events, ("a", "a", "a", "b"), 6)
    result = run(watched, tokenizers, policy, max_tokens=40)
    assert [s.model for s in result.segments] == ["a", "a", "a", "b"]
    assert policy.drafted == [1, 2, 3, 4]  # every decision after a write had a draft running


def test_a_stream_given_up_with_a_draft_in_flight_leaves_no_session(engines, tokenizers):
    coord = Coordinator(engines, tokenizers,
                        resolve_policy=lambda *_: Script(WRITERS, 7, speculate=True))  # fmt: skip

    async def first_event_only() -> None:
        stream = coord.run(make_request(models=("a", "b", "c", "d"), max_tokens=60))
        async for _ in stream:
            break  # the first segment is out; its writer is drafting the second
        await stream.aclose()
        await asyncio.sleep(0.5)  # the draft ends on a closed session; its error is retrieved

    asyncio.run(first_event_only())
    assert live_sessions(engines) == 0


def test_the_switcher_asks_for_speculation_unless_told_not_to(tiny_model_dir):
    params = {"switcher_path": str(tiny_model_dir), "segment_len": 8}
    assert SwitchParams(**params).speculate
    view = SequenceView("r", "Hi", ("a", "b"), (), 0, 0, 16, None)
    on = asyncio.run(Switch(SwitchParams(**params)).decide(view))
    off = asyncio.run(Switch(SwitchParams(**params, speculate=False)).decide(view))
    assert on.speculate and not off.speculate
    assert replace(on, speculate=False) == off


def test_a_draft_serves_only_a_decision_that_writes_the_same():
    """Who made the decision and whether it speculates do not change the text; every other
    field (a sampling seed of its own included) does, so the draft is not reused for it."""
    decision = WriteSegment("a", 4, speculate=True, version="v1")
    state = SequenceState(request_id="r", prompt="p", models=("a", "b"), max_tokens=20, turn=1)
    draft = Draft(decision, state, session=None, task=None)  # matching reads neither
    assert draft.matches(replace(decision, version="v2", speculate=False), state)
    for other in ({"model": "b"}, {"max_tokens": 8}, {"end_on_eos": False}, {"sample_seed": 3}):
        assert not draft.matches(replace(decision, **other), state), other
    assert not draft.matches(decision, replace(state, turn=2))
