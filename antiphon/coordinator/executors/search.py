"""`SearchStep` (weak-to-strong chunk-level beam search): the search's beams live here.

One step expands every live beam K ways (W*K from the committed sequence on the first step):
each child samples a chunk of L tokens from the proposer, is scored by the guide pair
(child score = parent score + log p_tuned(chunk) - log p_untuned(chunk), from guide sessions
forked with the beams, so a step costs O(L) per child, not O(length)), and the best W of the
children and the finished beams survive; ties keep the earlier one. Chunks every live beam
shares can no longer change and are committed at once; when every beam has finished, the best
is committed and its sessions become the models' own. Another decision (or the end of the
budget) settles the search the same way. A `SessionLost` reopens every beam's sessions from
the state and retries the step once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import TypeVar

from antiphon.coordinator.commit import Outcome, apply
from antiphon.coordinator.executors.base import ExecutionContext
from antiphon.coordinator.sessions import ModelSession
from antiphon.errors import SessionLost
from antiphon.logging import get_logger
from antiphon.policies.base import SearchStep
from antiphon.sequence import Segment, SequenceState

log = get_logger(__name__)
T = TypeVar("T")
ROOT = -1  # the beam of the committed sequence: its sessions are the models' own

SessionRef = tuple[str, str]  # (model name, session id)


@dataclass(frozen=True, slots=True)
class Beam:
    """One live hypothesis: chunks after the committed sequence, not yet committed."""

    beam_id: int  # unique within the request; names the beam's sessions
    chunks: tuple[Segment, ...]
    score: float  # sum over chunks of log p_tuned - log p_untuned
    finished: bool  # its last chunk ended the sequence (eos, stop string or budget)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


@dataclass(frozen=True, slots=True)
class _Child:
    parent: Beam
    beam: Beam
    chunk: Segment
    proposer_session: str


class SearchExecutor:
    """Runs `SearchStep`s of one request and keeps their beams between turns."""

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx
        self.sessions = ctx.sessions
        self.search: SearchStep | None = None  # the search under way
        self.beams: list[Beam] = []
        self.beam_sessions: dict[int, tuple[str, str, str]] = {}  # proposer, tuned, untuned
        self.next_beam_id = 0

    async def run(self, decision: SearchStep, state: SequenceState) -> Outcome:
        settled = Outcome()
        if self.search is not None and not self.search.same_search(decision) and self.beams:
            settled = await self.settle(state)  # the search changed shape: end the old one
            state = apply(state, settled, self.ctx.trim)
            if state.done:
                return settled
        self.search = decision
        try:
            stepped = await self._step(decision, state)
        except SessionLost:
            log.warning("search_session_lost")
            await self._reopen(decision, state)
            stepped = await self._step(decision, state)
        return settled.then(stepped)

    async def settle(self, state: SequenceState) -> Outcome:
        """Commit the best beam (the first of equals) and make its sessions the models' own."""
        if not self.beams or self.search is None:
            return Outcome()
        best = max(self.beams, key=lambda b: b.score)
        to_close: list[SessionRef] = []
        for beam in self.beams:
            if beam is not best:
                to_close += self._forget_beam(beam.beam_id)
        best_sids = self.beam_sessions.pop(best.beam_id)
        synced = len(state.segments) + len(best.chunks)
        for ms, sid in zip(self._trio(self.search), best_sids, strict=True):
            self.sessions.detached.discard((ms.name, sid))
            old = ms.adopt(sid, synced)
            if old is not None:
                to_close.append((ms.name, old))
        self.beams = []
        await self.sessions.close(to_close)
        return Outcome(best.chunks)

    # -- one step ---------------------------------------------------------------------------

    def _trio(self, d: SearchStep) -> tuple[ModelSession, ModelSession, ModelSession]:
        return self.sessions[d.proposer], self.sessions[d.tuned], self.sessions[d.untuned]

    async def _step(self, d: SearchStep, state: SequenceState) -> Outcome:
        prop, tuned, untuned = self._trio(d)
        if not self.beams:
            await _gather_all(prop.sync(state), tuned.sync(state), untuned.sync(state))
            root = Beam(ROOT, (), 0.0, False)
            self.beam_sessions[ROOT] = (prop.session_id, tuned.session_id, untuned.session_id)
            parents, per_parent = [root], d.width * d.successors
        else:
            parents, per_parent = [b for b in self.beams if not b.finished], d.successors
        carried = [b for b in self.beams if b.finished]
        created: list[SessionRef] = []  # every session forked in this step
        first_child_id = self.next_beam_id
        try:
            expanded = await _gather_all(
                *(self._expand(d, state, p, i, per_parent, created) for i, p in enumerate(parents))
            )
            children = [c for cs in expanded for c in cs]
            kept = rank(carried + [c.beam for c in children], d.width)
            kept_ids = {b.beam_id for b in kept}
            await _gather_all(
                *(self._child_guides(d, c, created) for c in children if c.beam.beam_id in kept_ids)
            )
        except BaseException:
            for beam_id in [b for b in self.beam_sessions if b >= first_child_id]:
                del self.beam_sessions[beam_id]
            await self.sessions.close(created)
            raise
        to_close = [
            (d.proposer, c.proposer_session) for c in children if c.beam.beam_id not in kept_ids
        ]
        for parent in parents:  # replaced by their children; the root's are the models' own
            if parent.beam_id != ROOT:
                to_close += self._forget_beam(parent.beam_id)
        self.beam_sessions.pop(ROOT, None)
        await self.sessions.close(to_close)
        self.beams = kept
        committed = self._take_common_prefix()
        if all(b.finished for b in self.beams):
            after = apply(state, Outcome(committed), self.ctx.trim)
            return Outcome(committed).then(await self.settle(after))
        return Outcome(committed)

    async def _expand(
        self,
        d: SearchStep,
        state: SequenceState,
        parent: Beam,
        p_index: int,
        n: int,
        created: list[SessionRef],
    ) -> list[_Child]:
        """n children of one beam: fork, sample a chunk each (batched by the engine), score."""
        prop, tuned, untuned = self._trio(d)
        p_sid, t_sid, u_sid = self.beam_sessions[parent.beam_id]
        room = state.tokens_left - parent.num_tokens
        child_sids = await prop.model.fork(p_sid, n)
        self._track(created, [(prop.name, sid) for sid in child_sids])
        gens = await _gather_all(
            *(
                prop.model.generate(
                    sid,
                    self.ctx.sampling(
                        min(d.chunk_len, room),
                        seed_parts=(state.turn, p_index, k),
                        temperature=d.temperature,
                    ),
                )
                for k, sid in enumerate(child_sids)
            )
        )
        chunks = [
            Segment(
                d.proposer, g.token_ids, g.text, g.logprobs, state.turn, "search", g.finish_reason
            )
            for g in gens
        ]
        ratios = await _gather_all(
            *(self._chunk_log_ratio(tuned, untuned, t_sid, u_sid, c) for c in chunks)
        )
        children = []
        for chunk, ratio, sid in zip(chunks, ratios, child_sids, strict=True):
            finished = chunk.model_finish in ("eos", "stop") or len(chunk.token_ids) >= room
            beam = Beam(self.next_beam_id, parent.chunks + (chunk,), parent.score + ratio, finished)
            self.next_beam_id += 1
            children.append(_Child(parent, beam, chunk, sid))
        return children

    async def _chunk_log_ratio(
        self, tuned: ModelSession, untuned: ModelSession, t_sid: str, u_sid: str, c: Segment
    ) -> float:
        lp_t, lp_u = await _gather_all(
            tuned.model.score(t_sid, self._guide_ids(tuned, [c])),
            untuned.model.score(u_sid, self._guide_ids(untuned, [c])),
        )
        return float(sum(lp_t) - sum(lp_u))

    def _guide_ids(self, guide: ModelSession, chunks: list[Segment]) -> list[int]:
        """A guide's ids for proposer chunks; text for a foreign tokenizer, with the guide's
        own end token after a finished response (the proposer's eos is not in the text)."""
        ids = guide.ids_for(chunks)
        last = chunks[-1] if chunks else None
        if (
            last is not None
            and last.model_finish == "eos"
            and guide.info.eos_token_ids
            and self.sessions.fingerprint(last.model) != guide.info.tokenizer_fingerprint
        ):
            ids.append(guide.info.eos_token_ids[0])
        return ids

    async def _child_guides(self, d: SearchStep, child: _Child, created: list[SessionRef]) -> None:
        """Guide sessions of a kept child: its parent's, forked, plus the child's chunk."""
        _, tuned, untuned = self._trio(d)
        _, t_sid, u_sid = self.beam_sessions[child.parent.beam_id]

        async def fork_append(ms: ModelSession, sid: str) -> str:
            (new,) = await ms.model.fork(sid, 1)
            self._track(created, [(ms.name, new)])
            await ms.model.append(new, self._guide_ids(ms, [child.chunk]))
            return new

        t_new, u_new = await _gather_all(fork_append(tuned, t_sid), fork_append(untuned, u_sid))
        self.beam_sessions[child.beam.beam_id] = (child.proposer_session, t_new, u_new)

    # -- bookkeeping ------------------------------------------------------------------------

    def _track(self, created: list[SessionRef], refs: list[SessionRef]) -> None:
        """Sessions opened beside the models' own: closed with the request if not before."""
        created += refs
        self.sessions.detached.update(refs)

    def _forget_beam(self, beam_id: int) -> list[SessionRef]:
        """Forget a beam's sessions; return them for closing."""
        sids = self.beam_sessions.pop(beam_id, None)
        if sids is None or self.search is None:
            return []
        return list(zip(self.search.models(), sids, strict=True))

    def _take_common_prefix(self) -> tuple[Segment, ...]:
        """Chunks every live beam shares can no longer change: take them off the beams."""
        beams = self.beams
        n = 0
        while all(len(b.chunks) > n and b.chunks[n] is beams[0].chunks[n] for b in beams):
            n += 1
        if n == 0:
            return ()
        shared = beams[0].chunks[:n]
        self.beams = [replace(b, chunks=b.chunks[n:]) for b in beams]
        return shared

    async def _reopen(self, d: SearchStep, state: SequenceState) -> None:
        """Rebuild every live beam's sessions from the state (prompt + segments + its chunks)."""
        refs: list[SessionRef] = []
        for beam_id in [b for b in self.beam_sessions if b != ROOT]:
            refs += self._forget_beam(beam_id)
        self.beam_sessions.clear()
        trio = self._trio(d)
        for ms in trio:
            if ms.session_id is not None:  # reopened by the next sync
                refs.append((ms.name, ms.session_id))
                ms.session_id = None
        await self.sessions.close(refs)

        async def open_beam(beam: Beam) -> None:
            sids = await _gather_all(*(ms.open_detached(state, beam.chunks) for ms in trio))
            self.sessions.detached.update(zip((ms.name for ms in trio), sids, strict=True))
            self.beam_sessions[beam.beam_id] = tuple(sids)

        await _gather_all(*(open_beam(b) for b in self.beams))


def rank(pool: list[Beam], width: int) -> list[Beam]:
    """The best `width` beams by score, highest first; ties keep the earlier one."""
    order = sorted(range(len(pool)), key=lambda i: (-pool[i].score, i))
    return [pool[i] for i in order[:width]]


async def _gather_all(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but waits for every awaitable before raising the first error, so
    no call is still creating sessions while the caller cleans up after a failure."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
