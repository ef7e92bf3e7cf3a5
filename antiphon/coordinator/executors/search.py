"""`SearchStep` (weak-to-strong chunk-level beam search): the search's beams live here.

One step expands every live beam K ways (W*K from the committed sequence on the first step):
each child samples a chunk of up to L tokens from the proposer (every child of the step is
sampled at once, so the engine batches them), and is scored by the guide pair: score =
log p_tuned(response) - log p_untuned(response), the response being everything the search has
written. The best W of the children and of the finished beams survive (ties keep the earlier
one); finished beams stay candidates until the search ends.

Scoring is incremental: a child's guide sessions are its parent's, forked, with the chunk
scored and kept in one call (`score(..., keep=True)`), so a step costs each guide O(L) tokens
per child, not O(length). A guide whose tokenizer is not the proposer's reads the response's
text: it re-tokenizes the whole response text (cheap, no model), keeps its parent's tokens up
to the first one that differs (a chunk can merge with the parent's last tokens), forks its
parent's session there and scores only the tokens after it. So the score always equals a
full re-score of the response in the guide's tokenizer (`full_log_ratio`, what the tests and
the benchmark compare against).

Chunks every live beam shares can no longer change and are committed at once (streamed, with
their writer). When every beam has finished, the best is committed and its sessions become
the models' own. Another decision (or the end of the budget) settles the search the same
way. A `SessionLost` reopens every beam's sessions from what the search holds and retries the
step once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
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

SessionRef = tuple[str, str]  # (model name, session id)


@dataclass(frozen=True, slots=True)
class GuideTrack:
    """A beam's response in one guide's tokenizer: the guide session holding it (after the
    search's root), its token ids and the log-prob of each."""

    session_id: str
    ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Beam:
    """One hypothesis: what the search wrote on it, and its sessions."""

    beam_id: int  # unique within the request
    chunks: tuple[Segment, ...]  # not yet committed
    text: str  # everything the search wrote on this beam, committed chunks included
    proposer_session: str
    tuned: GuideTrack
    untuned: GuideTrack
    finished: bool  # its last chunk ended the sequence (eos, stop string, budget or context)

    @property
    def score(self) -> float:
        """log p_tuned(response) - log p_untuned(response)."""
        return sum(self.tuned.logprobs) - sum(self.untuned.logprobs)

    @property
    def num_tokens(self) -> int:
        """Proposer tokens not yet committed (the budget they use)."""
        return sum(len(c.token_ids) for c in self.chunks)

    def refs(self, d: SearchStep) -> list[SessionRef]:
        sids = (self.proposer_session, self.tuned.session_id, self.untuned.session_id)
        return list(zip(d.models(), sids, strict=True))


@dataclass(frozen=True, slots=True)
class _Root:
    """Where the search started, per model: the ids its root session holds (prompt and the
    committed sequence then), and the chunks committed since."""

    ids: dict[str, list[int]]
    committed: tuple[Segment, ...] = ()


class SearchExecutor:
    """Runs `SearchStep`s of one request and keeps their beams between turns."""

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx
        self.sessions = ctx.sessions
        self.search: SearchStep | None = None  # the search under way
        self.root: _Root | None = None
        self.beams: list[Beam] = []
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
            await self._reopen(decision)
            stepped = await self._step(decision, state)
        return settled.then(stepped)

    async def settle(self, state: SequenceState) -> Outcome:
        """Commit the best beam (the first of equals) and make its sessions the models' own."""
        if not self.beams or self.search is None:
            return Outcome()
        best = max(self.beams, key=lambda b: b.score)
        to_close = [ref for b in self.beams if b is not best for ref in b.refs(self.search)]
        synced = len(state.segments) + len(best.chunks)
        for (name, sid), ms in zip(best.refs(self.search), self._trio(self.search), strict=True):
            self.sessions.detached.discard((name, sid))
            old = ms.adopt(sid, synced)
            if old is not None:
                to_close.append((name, old))
        self.beams, self.root = [], None
        await self.sessions.close(to_close)
        return Outcome(best.chunks)

    # -- one step ---------------------------------------------------------------------------

    def _trio(self, d: SearchStep) -> tuple[ModelSession, ModelSession, ModelSession]:
        return self.sessions[d.proposer], self.sessions[d.tuned], self.sessions[d.untuned]

    async def _step(self, d: SearchStep, state: SequenceState) -> Outcome:
        created: list[SessionRef] = []  # every session opened in this step
        try:
            if not self.beams:
                root = await self._open_root(d, state, created)
                parents, per_parent = [root], d.width * d.successors
            else:
                parents, per_parent = [b for b in self.beams if not b.finished], d.successors
            children = await self._expand(d, state, parents, per_parent, created)
        except BaseException:
            await self.sessions.close(created)
            raise
        carried = [b for b in self.beams if b.finished]
        kept = rank(carried + children, d.width)
        kept_ids = {b.beam_id for b in kept}
        dropped = [b for b in parents + children if b.beam_id not in kept_ids]
        to_close = [ref for b in dropped for ref in b.refs(d)]
        await self.sessions.close(to_close)
        self.beams = kept
        committed = self._take_common_prefix()
        if all(b.finished for b in self.beams):
            after = apply(state, Outcome(committed), self.ctx.trim)
            return Outcome(committed).then(await self.settle(after))
        return Outcome(committed)

    async def _open_root(
        self, d: SearchStep, state: SequenceState, created: list[SessionRef]
    ) -> Beam:
        """The beam of the committed sequence: a session of each model holding it."""
        trio = self._trio(d)
        ids = {ms.name: ms.prompt_ids() + ms.ids_for(state.segments) for ms in trio}
        opened = await _gather_all(*(ms.model.open(ids[ms.name]) for ms in trio))
        self._track(created, [(ms.name, s.session_id) for ms, s in zip(trio, opened, strict=True)])
        self.root = _Root(ids)
        p, t, u = (s.session_id for s in opened)
        empty = GuideTrack(t, (), ()), GuideTrack(u, (), ())
        beam = Beam(self.next_beam_id, (), "", p, *empty, finished=False)
        self.next_beam_id += 1
        return beam

    async def _expand(
        self,
        d: SearchStep,
        state: SequenceState,
        parents: list[Beam],
        n: int,
        created: list[SessionRef],
    ) -> list[Beam]:
        """n children of each parent: fork, sample every chunk at once, score with the guides."""
        prop, tuned, untuned = self._trio(d)
        forked = await _gather_all(*(prop.model.fork(p.proposer_session, n) for p in parents))
        self._track(created, [(prop.name, sid) for sids in forked for sid in sids])
        jobs = [
            (parent, sid, (state.turn, i, k))
            for i, (parent, sids) in enumerate(zip(parents, forked, strict=True))
            for k, sid in enumerate(sids)
        ]

        def sampling(parent: Beam, parts: tuple[int, ...]):
            budget = min(d.chunk_len, self._room(d, state, parent))
            return self.ctx.sampling(
                d.proposer, budget, seed_parts=parts, temperature=d.temperature
            )

        gens = await _gather_all(
            *(prop.model.generate(sid, sampling(parent, parts)) for parent, sid, parts in jobs)
        )
        chunks = [
            Segment(
                d.proposer,
                g.token_ids,
                g.text,
                g.logprobs,
                state.turn,
                "search",
                g.finish_reason,
                top_logprobs=g.top_logprobs,
            )  # fmt: skip
            for g in gens
        ]
        tracks = await _gather_all(
            *(
                _gather_all(
                    self._guide_child(tuned, parent.tuned, parent.text, chunk, created),
                    self._guide_child(untuned, parent.untuned, parent.text, chunk, created),
                )
                for (parent, _, _), chunk in zip(jobs, chunks, strict=True)
            )
        )
        children = []
        for (parent, sid, _), chunk, (t, u) in zip(jobs, chunks, tracks, strict=True):
            finished = chunk.model_finish in ("eos", "stop") or len(chunk.token_ids) >= self._room(
                d, state, parent
            )
            beam_text = parent.text + chunk.text
            chunks_now = parent.chunks + (chunk,)
            children.append(Beam(self.next_beam_id, chunks_now, beam_text, sid, t, u, finished))
            self.next_beam_id += 1
        return children

    def _room(self, d: SearchStep, state: SequenceState, beam: Beam) -> int:
        """Tokens the proposer may still write on this beam: the budget or its context, which
        ever ends first (at least 1: a full context is the engine's error to raise)."""
        assert self.root is not None
        run = sum(len(c.token_ids) for c in self.root.committed + beam.chunks)
        context_left = (
            self.sessions[d.proposer].info.max_context - len(self.root.ids[d.proposer]) - run
        )
        return max(1, min(state.tokens_left - beam.num_tokens, context_left))

    async def _guide_child(
        self,
        guide: ModelSession,
        old: GuideTrack,
        parent_text: str,
        chunk: Segment,
        created: list[SessionRef],
    ) -> GuideTrack:
        """A parent's track in `guide` extended by a chunk: fork the parent's session where the
        new ids part from the parent's, score (and keep) the rest."""
        assert self.root is not None
        new = self._guide_ids(guide, old, parent_text, chunk)
        same = _common_prefix(old.ids, new)
        base = len(self.root.ids[guide.name])
        (sid,) = await guide.model.fork(old.session_id, 1, base + same)
        self._track(created, [(guide.name, sid)])
        scored = await guide.model.score(sid, list(new[same:]), keep=True) if new[same:] else []
        return GuideTrack(sid, new, old.logprobs[:same] + tuple(scored))

    def _guide_ids(
        self, guide: ModelSession, old: GuideTrack, parent_text: str, chunk: Segment
    ) -> tuple[int, ...]:
        """The response after the root in the guide's ids: the proposer's own for a guide of
        its tokenizer; else the text re-tokenized, with the guide's end token after a response
        that ended (the proposer's end token is not in the text)."""
        if self.sessions.fingerprint(chunk.model) == guide.info.tokenizer_fingerprint:
            return old.ids + chunk.token_ids
        ids = guide.encode(parent_text + chunk.text)
        if chunk.model_finish == "eos" and guide.info.eos_token_ids:
            ids.append(guide.info.eos_token_ids[0])
        return tuple(ids)

    # -- bookkeeping ------------------------------------------------------------------------

    def _track(self, created: list[SessionRef], refs: list[SessionRef]) -> None:
        """Sessions opened beside the models' own: closed with the request if not before."""
        created += refs
        self.sessions.detached.update(refs)

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
        assert self.root is not None
        self.root = replace(self.root, committed=self.root.committed + shared)
        return shared

    async def _reopen(self, d: SearchStep) -> None:
        """Rebuild every beam's sessions from what the search holds (a replica was lost)."""
        refs = [ref for b in self.beams for ref in b.refs(d)]
        await self.sessions.close(refs)
        if not self.beams or self.root is None:
            self.beams = []  # the first step reopens its root from the state
            return
        prop, tuned, untuned = self._trio(d)
        root = self.root

        async def open_beam(beam: Beam) -> Beam:
            run = prop.ids_for(root.committed + beam.chunks)
            p, t, u = await _gather_all(
                prop.model.open(root.ids[prop.name] + run),
                tuned.model.open(root.ids[tuned.name] + list(beam.tuned.ids)),
                untuned.model.open(root.ids[untuned.name] + list(beam.untuned.ids)),
            )
            self.sessions.detached.update(
                zip(d.models(), (p.session_id, t.session_id, u.session_id), strict=True)
            )
            tracks = (
                replace(beam.tuned, session_id=t.session_id),
                replace(beam.untuned, session_id=u.session_id),
            )
            return replace(beam, proposer_session=p.session_id, tuned=tracks[0], untuned=tracks[1])

        self.beams = await _gather_all(*(open_beam(b) for b in self.beams))


def rank(pool: list[Beam], width: int) -> list[Beam]:
    """The best `width` beams by score, highest first; ties keep the earlier one."""
    order = sorted(range(len(pool)), key=lambda i: (-pool[i].score, i))
    return [pool[i] for i in order[:width]]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def _gather_all(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but waits for every awaitable before raising the first error, so
    no call is still creating sessions while the caller cleans up after a failure."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
