"""Speculative continuation: while the policy decides who writes next, the writer of the last
segment drafts the next one, as if it were chosen again.

A draft is the segment `write_segment` would write for that decision on the next turn: same
session, same sampling settings, same seed parts. If the policy does choose it again (same
model, budget, end-token rule and sampling seed), the draft is the turn's outcome, so a
response is the same with speculation on or off; the policy's call is hidden behind the
writer's tokens. Otherwise
the draft is cut off the writer's session (`truncate` back to where it was), and the turn
pays only what the draft costs beside the new writer. A policy asks for it per decision
(`WriteSegment.speculate`): it pays off for slow decisions that often keep the writer (a
learned switcher), not for a rule that switches every turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from antiphon.coordinator.commit import Outcome
from antiphon.coordinator.sessions import ModelSession
from antiphon.messages import Generation
from antiphon.policies.base import WriteSegment
from antiphon.sequence import SequenceState

DraftWriter = Callable[[SequenceState, WriteSegment], Awaitable[tuple[Outcome, Generation | None]]]


def next_turn(state: SequenceState) -> SequenceState:
    """The state the next turn starts from (the turn loop counts a turn after committing)."""
    return replace(state, turn=state.turn + 1)


@dataclass
class Draft:
    """One segment drafted ahead of its decision, by `decision.model` after `state`."""

    decision: WriteSegment
    state: SequenceState  # what the draft continues (the next turn's starting state)
    session: ModelSession
    task: asyncio.Task  # -> (outcome, first generate call's result)

    @classmethod
    def start(cls, write: DraftWriter, state: SequenceState, decision: WriteSegment,
              session: ModelSession) -> Draft:  # fmt: skip
        task = asyncio.ensure_future(write(state, decision))
        # a request that fails or is cancelled meanwhile never awaits it: retrieve its error
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return cls(decision, state, session, task)

    def matches(self, decision: WriteSegment, state: SequenceState) -> bool:
        """Whether this draft is what the decision would write after the state."""
        d = self.decision
        # every field but the two that do not change what is written, so a field added to
        # WriteSegment counts here without being listed
        return (
            replace(decision, version=d.version, speculate=d.speculate) == d
            and state.segments == self.state.segments
            and state.turn == self.state.turn
            and state.tokens_left == self.state.tokens_left
        )

    async def take(self) -> Outcome:
        outcome, _ = await self.task
        return outcome

    async def discard(self) -> None:
        """Wait for the draft to end, then cut what it wrote off the writer's session."""
        _, gen = await self.task
        if gen is None:
            return  # no room to write: the session is as it was
        before = gen.length - len(gen.token_ids)  # the session, up to date, before the draft
        await self.session.truncate(before)
        self.session.synced = len(self.state.segments)
