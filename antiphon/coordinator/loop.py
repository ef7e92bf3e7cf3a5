"""The turn loop: decide, run, append -- as a plain async class with no Ray in it.

    coordinator = Coordinator(models={"a": engine_a, "b": engine_b},
                              tokenizers={"a": tok_a, "b": tok_b}, turn_sink=sink)
    async for event in coordinator.run(request):     # SegmentEvent ..., then one FinishEvent
        print(event)
    result = await coordinator.generate(request)     # or all at once

`models` are anything implementing `SessionModel` (the in-process engine, or the Serve
client); the deployment in `antiphon.coordinator.deployment` wraps this class unchanged.

Each turn: ask the policy (one call), run its decision on the model sessions, append the
new segment(s) to the `SequenceState`, stream them, and keep their turn records (sent to the
turn log in one batch when the request ends). Sessions are opened lazily, one per model per
request, and brought up to date just before the model writes or scores ("sync"). A write is
one model call: `generate` carries the tokens its session lacks as `prefix_ids` (or, for a
model's first write, opens the session with the prompt and every segment so far):

- models whose tokenizer fingerprints match exchange token ids as written;
- otherwise the text of a run of foreign segments is re-tokenized as a whole with the
  receiving model's tokenizer (merges inside the run are right; a merge across the boundary
  with the receiver's own previous tokens is not made -- the receiver sees the text as if it
  had stopped there, which is what it did).

A `SessionLost` from a model (replica restarted, session evicted) reopens that model's
session from the state (prompt + all committed segments) and retries the call once.

Every log line written during a request carries its `request_id`, and during a turn its
`turn` (bound with `antiphon.logging.log_context`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from antiphon.actors.messages import Generation, ModelInfo, SamplingParams
from antiphon.actors.protocol import SessionModel
from antiphon.coordinator.request import (
    FinishEvent,
    GenerationRequest,
    GenerationResult,
    SegmentEvent,
    StreamEvent,
    Usage,
)
from antiphon.coordinator.state import (
    Beam,
    Segment,
    SegmentKind,
    SequenceState,
    SequenceStatus,
)
from antiphon.errors import InvalidRequest, NotFound, PromptTooLong, SessionLost
from antiphon.logging import get_logger, log_context
from antiphon.policies.base import (
    Decision,
    Finish,
    Policy,
    SearchStep,
    WriteSegment,
    WriteUntilDeferral,
    decision_models,
)
from antiphon.policies.registry import build_policy
from antiphon.training.turn_log import Record, RequestRecord, TurnRecord, TurnSink

log = get_logger(__name__)
T = TypeVar("T")

# Makes a policy for a request: (policy name, params, ensemble) -> Policy. The default builds
# rule policies in-process; the deployment routes hosted policies to their actors.
PolicyResolver = Callable[[str, Mapping[str, object], tuple[str, ...]], Policy]

_MAX_CHAR_COMPLETION_TOKENS = 3  # extra tokens allowed to finish a split UTF-8 character


def _derive_seed(seed: int | None, *parts: int) -> int | None:
    """A distinct, reproducible seed per (request seed, turn, child): same seed, same output."""
    if seed is None:
        return None
    h = seed
    for p in parts:
        h = (h * 1_000_003 + p + 1) % (2**62)
    return h


class _ModelSession:
    """One model's session for one request, and how much of the state it already holds."""

    def __init__(self, run: _Run, name: str) -> None:
        self.run = run
        self.name = name
        self.model = run.coord.models[name]
        self.tokenizer = run.coord.tokenizers[name]
        self.info = run.coord.infos[name]
        self.fingerprint = self.info.tokenizer_fingerprint
        self.session_id: str | None = None
        self.synced = 0  # state.segments[:synced] are in the session

    def ids_for(self, segments: list[Segment] | tuple[Segment, ...]) -> list[int]:
        """Token ids, in this model's tokenizer, of segments written by any model."""
        out: list[int] = []
        text_run: list[str] = []
        for seg in segments:
            if self.run.coord.infos[seg.model].tokenizer_fingerprint == self.fingerprint:
                if text_run:
                    out += self.encode("".join(text_run))
                    text_run = []
                out += seg.token_ids
            else:
                text_run.append(seg.text)
        if text_run:
            out += self.encode("".join(text_run))
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self) -> list[int]:
        """The request's prompt in this model's tokenizer (special tokens included)."""
        return self.run.prompt_ids(self.name)

    def context_room(self) -> int:
        """Tokens this model can still write: its context minus the sequence in its ids."""
        used = len(self.prompt_ids()) + len(self.ids_for(self.run.state.segments))
        return self.info.max_context - used

    async def open(self) -> None:
        state = self.run.state
        info = await self.model.open(self.prompt_ids() + self.ids_for(state.segments))
        self.session_id = info.session_id
        self.synced = len(state.segments)

    async def open_detached(self, extra: tuple[Segment, ...]) -> str:
        """A new session holding the state plus `extra` segments, not this object's own."""
        state = self.run.state
        ids = self.prompt_ids() + self.ids_for(state.segments) + self.ids_for(extra)
        return (await self.model.open(ids)).session_id

    async def sync(self) -> None:
        """Open the session if needed, then append the committed segments it lacks."""
        if self.session_id is None:
            await self.open()
            return
        segments = self.run.state.segments
        ids = self.ids_for(segments[self.synced :])
        if ids:
            await self.model.append(self.session_id, ids)
        self.synced = len(segments)

    async def generate(self, params: SamplingParams) -> Generation:
        """Sync and generate in one call; on SessionLost reopen from the state, retry once."""
        try:
            return await self._sync_and_generate(params)
        except SessionLost:
            log.warning("session_lost", model=self.name)  # request_id, turn: bound
            self.session_id = None
            return await self._sync_and_generate(params)

    async def _sync_and_generate(self, params: SamplingParams) -> Generation:
        """One model call: the committed segments the session lacks go as the generate call's
        prefix (no session yet: the prompt and all segments open one), so a turn costs one
        round trip and the catch-up rides in the same forward pass as the first new token."""
        segments = self.run.state.segments
        if self.session_id is None:
            prefix = self.prompt_ids() + self.ids_for(segments)
        else:
            prefix = self.ids_for(segments[self.synced :])
        gen = await self.model.generate(self.session_id, params, prefix)
        self.session_id, self.synced = gen.session_id, len(segments)
        return gen

    async def close(self) -> None:
        if self.session_id is not None:
            sid, self.session_id = self.session_id, None
            await self.model.close(sid)


@dataclass
class _Timing:
    policy_ms: float = 0.0  # waiting for the decision
    model_ms: float = 0.0  # in model calls
    wall_ms: float = 0.0  # the whole turn, its segments streamed out included


class Coordinator:
    """Runs requests over a fixed set of models. Safe to share between concurrent requests."""

    def __init__(
        self,
        models: Mapping[str, SessionModel],
        tokenizers: Mapping[str, PreTrainedTokenizerBase],
        *,
        resolve_policy: PolicyResolver = build_policy,
        turn_sink: TurnSink | None = None,
        close_in_background: bool = False,
    ) -> None:
        missing = sorted(set(models) - set(tokenizers))
        if missing:
            raise ValueError(f"no tokenizer for models {missing}")
        self.models = dict(models)
        self.tokenizers = dict(tokenizers)
        self.resolve_policy = resolve_policy
        self.turn_sink = turn_sink
        # True (the Serve deployment, whose event loop outlives requests): a request's
        # sessions are closed and its records sent by a task after its last event, so the
        # response does not wait for them; `drain()` waits. False: before the last event
        # returns (an `asyncio.run` per request would cancel such a task).
        self.close_in_background = close_in_background
        self._endings: set[asyncio.Task] = set()  # background request endings under way
        self.infos: dict[str, ModelInfo] = {}  # fetched once per model, on first use

    async def _ensure_infos(self, names: tuple[str, ...]) -> None:
        todo = [n for n in names if n not in self.infos]
        if todo:
            infos = await asyncio.gather(*(self.models[n].info() for n in todo))
            self.infos.update(zip(todo, infos, strict=True))

    async def run(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Stream the response: one SegmentEvent per committed segment, then a FinishEvent."""
        run = await self._start(request)
        async for event in self._drive(run):
            yield event

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run the request to the end and return the whole response."""
        run = await self._start(request)
        async for _ in self._drive(run):
            pass
        return run.result()

    async def _start(self, request: GenerationRequest) -> _Run:
        unknown = [m for m in request.models if m not in self.models]
        if unknown:
            raise NotFound(f"unknown model(s) {unknown}; known models: {sorted(self.models)}")
        policy = self.resolve_policy(request.policy, request.policy_params, request.models)
        await self._ensure_infos(request.models)
        return _Run(self, request, policy)

    async def _drive(self, run: _Run) -> AsyncIterator[StreamEvent]:
        error: BaseException | None = None
        try:
            with log_context(request_id=run.state.request_id):
                async for event in run.turns():
                    yield event
        except BaseException as e:  # also cancel / generator close: log, close, re-raise
            error = e
            run.state.fail()
            raise
        finally:
            if self.close_in_background:
                task = asyncio.create_task(self._end(run, error))
                self._endings.add(task)
                task.add_done_callback(self._ended)
            else:
                await self._end(run, error)

    async def _end(self, run: _Run, error: BaseException | None) -> None:
        """After a request's last event: close its sessions, send its records."""
        await run.close_sessions()
        await self._log(run, error)

    def _ended(self, task: asyncio.Task) -> None:
        self._endings.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("request_ending_failed", error=repr(task.exception()))

    async def drain(self) -> None:
        """Wait until every finished request's sessions are closed and its records sent."""
        while self._endings:
            await asyncio.gather(*list(self._endings), return_exceptions=True)

    async def _log(self, run: _Run, error: BaseException | None) -> None:
        if self.turn_sink is None:
            return
        state = run.state
        records: list[Record] = run.turn_records()
        records.append(
            RequestRecord(
                request_id=state.request_id,
                prompt=state.prompt,
                models=state.models,
                policy=run.policy.name,
                policy_version=run.policy.version,
                policy_params=dict(run.request.policy_params),
                num_turns=state.turn,
                num_segments=len(state.segments),
                text=state.text,
                finish_reason=state.finish_reason,
                error=None if error is None else f"{type(error).__name__}: {error}",
            )
        )
        try:
            await self.turn_sink.write(records)
        except Exception:  # the response is already out; losing a log batch must not fail it
            log.exception("turn_log_write_failed", request_id=state.request_id)


class _Run:
    """One request in flight: its state, its sessions, its unreleased segments."""

    def __init__(self, coord: Coordinator, request: GenerationRequest, policy: Policy) -> None:
        self.coord = coord
        self.request = request
        self.policy = policy
        self.state = SequenceState(
            request_id=request.request_id,
            prompt=request.prompt,
            models=request.models,
            max_tokens=request.max_tokens,
            stop=request.stop,
            seed=request.seed,
        )
        self.sessions: dict[str, _ModelSession] = {}
        # beam id -> its (proposer, tuned, untuned) session ids; -1: the models' own sessions
        self.beam_sessions: dict[int, tuple[str, str, str]] = {}
        self.next_beam_id = 0
        self.search: SearchStep | None = None  # the search under way, if any
        self.released = 0  # segments already streamed
        self.timings: dict[int, _Timing] = {}  # per turn
        self.commit_times: list[float] = []  # unix time each of state.segments was committed
        self.decisions: dict[int, Decision] = {}  # per turn
        self._prompt_ids: dict[str, list[int]] = {}  # model -> prompt in its tokenizer, once

    def prompt_ids(self, name: str) -> list[int]:
        """The prompt in model `name`'s tokenizer (special tokens included), a fresh list."""
        if name not in self._prompt_ids:
            tokenizer = self.coord.tokenizers[name]
            self._prompt_ids[name] = list(tokenizer(self.state.prompt)["input_ids"])
        return list(self._prompt_ids[name])

    # ----- the loop ----------------------------------------------------------------------

    async def turns(self) -> AsyncIterator[StreamEvent]:
        state = self.state
        state.status = SequenceStatus.RUNNING
        while not state.done:
            if state.tokens_left == 0:
                await self._resolve_beams()
                state.finish("length")
                break
            timing = self.timings[state.turn] = _Timing()
            t0 = time.perf_counter()
            with log_context(turn=state.turn):  # on every log line of this turn
                decision = await self.policy.decide(state.view())
                timing.policy_ms = (time.perf_counter() - t0) * 1e3
                self._check(decision)
                self.decisions[state.turn] = decision
                t1 = time.perf_counter()
                await self._execute(decision)
                timing.model_ms = (time.perf_counter() - t1) * 1e3
            state.turn += 1
            for event in self._release():
                yield event
            timing.wall_ms = (time.perf_counter() - t0) * 1e3
        for event in self._release():
            yield event
        yield FinishEvent(state.request_id, state.finish_reason or "policy", self._usage())

    def _check(self, decision: Decision) -> None:
        for name in decision_models(decision):
            if name not in self.state.models:
                raise InvalidRequest(
                    f"policy {self.policy.name!r} chose model {name!r}, which is not in the "
                    f"ensemble {list(self.state.models)}"
                )

    async def _execute(self, decision: Decision) -> None:
        if isinstance(decision, SearchStep):
            await self._search_step(decision)
            return
        await self._resolve_beams()  # any other decision ends a search: keep its best beam
        if self.state.done:
            return
        if isinstance(decision, Finish):
            self.state.finish("policy")
        elif isinstance(decision, WriteSegment):
            await self._write(
                decision.model, decision.max_tokens, "write", end_on_eos=decision.end_on_eos
            )
        elif isinstance(decision, WriteUntilDeferral):
            seg = await self._write(
                decision.base, decision.max_tokens, "write", gate=decision.gate_threshold
            )
            if not self.state.done and (seg is None or seg.model_finish == "gate"):
                await self._write(decision.assistant, decision.assistant_tokens, "deferred")
        else:  # a new Decision type without a branch here is a programming error
            raise TypeError(f"unknown decision {decision!r}")

    # ----- writing -----------------------------------------------------------------------

    def _session(self, name: str) -> _ModelSession:
        if name not in self.sessions:
            self.sessions[name] = _ModelSession(self, name)
        return self.sessions[name]

    def _params(self, max_new: int, *, seed_parts: tuple[int, ...], **kw: object) -> SamplingParams:
        r = self.request
        fields = dict(
            max_new_tokens=max_new,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            seed=_derive_seed(r.seed, *seed_parts),
            stop_strings=r.stop,
        )
        fields.update(kw)
        return SamplingParams(**fields)

    async def _write(
        self,
        name: str,
        max_tokens: int,
        kind: SegmentKind,
        gate: float | None = None,
        end_on_eos: bool = True,
    ) -> Segment | None:
        """`name` writes up to max_tokens; commit and return the segment (None if empty)."""
        ms = self._session(name)
        room = ms.context_room()
        if room <= 0 and not self.state.segments:
            raise PromptTooLong(
                f"the prompt is {len(ms.prompt_ids())} tokens; model {name!r} has a context of "
                f"{ms.info.max_context} tokens and no room left to write"
            )
        if room <= 0:
            # The response filled the writer's context: it cannot grow, as if out of budget.
            self.state.finish("length")
            return None
        max_new = min(max_tokens, self.state.tokens_left, room)
        params = self._params(max_new, seed_parts=(self.state.turn, 0), gate_threshold=gate)
        gen = await ms.generate(params)
        ids, text, logprobs = list(gen.token_ids), gen.text, list(gen.logprobs)
        finish = gen.finish_reason
        # A byte-level tokenizer can end a segment inside a UTF-8 character; finish the
        # character so every segment's text is whole (the next writer may use another tokenizer).
        extra = 0
        while (
            text.endswith("\ufffd")
            and finish == "length"
            and extra < _MAX_CHAR_COMPLETION_TOKENS
            and len(ids) < min(self.state.tokens_left, room)
        ):
            more = await ms.generate(self._params(1, seed_parts=(self.state.turn, 1 + extra)))
            ids += more.token_ids
            logprobs += more.logprobs
            finish = more.finish_reason
            text = ms.tokenizer.decode(ids, skip_special_tokens=True)
            extra += 1
        if finish == "eos" and not end_on_eos:
            # The end token leaves the sequence, and the writer's session (reopened without
            # it on the writer's next turn).
            ids, logprobs = ids[:-1], logprobs[:-1]
            await ms.close()
            if not ids:
                self.state.finish("eos")
                return None
        if not ids:
            return None
        seg = Segment(name, tuple(ids), text, tuple(logprobs), self.state.turn, kind, finish)
        ms.synced = len(self.state.segments) + 1  # its own segment is already in its session
        self._commit(seg, end_on_eos)
        return seg

    def _commit(self, seg: Segment, end_on_eos: bool = True) -> None:
        """Append a segment to the state; end the sequence on eos (if `end_on_eos`), stop
        string or budget."""
        state = self.state
        if state.done:
            return
        before = len(state.text)
        state.segments.append(seg)
        del self.commit_times[len(state.segments) - 1 :]  # segments cut at a stop string
        self.commit_times.append(time.time())
        if state.stop and self._cut_at_stop(before):
            state.finish("stop")
        elif seg.model_finish == "eos" and end_on_eos:
            state.finish("eos")
        elif seg.model_finish == "stop":  # the engine matched a stop string inside the segment
            state.finish("stop")
        elif state.tokens_left == 0:
            state.finish("length")

    def _cut_at_stop(self, search_from: int) -> bool:
        """If a stop string now occurs in the response, cut the response before it."""
        state = self.state
        text = state.text
        start = max(0, search_from - max(len(s) for s in state.stop) + 1)
        hits = [p for p in (text.find(s, start) for s in state.stop) if p >= 0]
        if not hits:
            return False
        cut = min(hits)
        kept: list[Segment] = []
        offset = 0
        for seg in state.segments:
            if offset + len(seg.text) <= cut:
                kept.append(seg)
            elif offset < cut:
                kept.append(self._trim(seg, cut - offset))
            offset += len(seg.text)
        state.segments[:] = kept
        return True

    def _trim(self, seg: Segment, n_chars: int) -> Segment:
        """The segment cut to its first n_chars characters (and the tokens that make them)."""
        tok = self.coord.tokenizers[seg.model]
        k = len(seg.token_ids)
        for i in range(1, len(seg.token_ids) + 1):
            if len(tok.decode(seg.token_ids[:i], skip_special_tokens=True)) >= n_chars:
                k = i
                break
        return replace(
            seg, token_ids=seg.token_ids[:k], text=seg.text[:n_chars], logprobs=seg.logprobs[:k]
        )

    # ----- streaming ---------------------------------------------------------------------

    def _release(self) -> list[SegmentEvent]:
        """Events for committed segments that can no longer change.

        While the response text ends with the start of a stop string, the segments that hold
        that start may still be cut by the next segment, so they wait for the next turn."""
        state = self.state
        segments = state.segments
        held = 0
        if not state.done and state.stop:
            text = state.text
            held = max(
                (m for s in state.stop for m in range(1, len(s)) if text.endswith(s[:m])),
                default=0,
            )
        limit = len(state.text) - held
        end = sum(len(s.text) for s in segments[: self.released])
        upto = self.released
        while upto < len(segments) and end + len(segments[upto].text) <= limit:
            end += len(segments[upto].text)
            upto += 1
        events = [
            SegmentEvent(
                request_id=state.request_id,
                index=i,
                turn=seg.turn,
                model=seg.model,
                kind=seg.kind,
                text=seg.text,
                token_count=len(seg.token_ids),
            )
            for i, seg in enumerate(segments[self.released : upto], start=self.released)
        ]
        self.released = upto
        return events

    # ----- weak-to-strong chunk-level beam search -----------------------------------------

    def _search_sessions(self, d: SearchStep) -> tuple[_ModelSession, _ModelSession, _ModelSession]:
        return self._session(d.proposer), self._session(d.tuned), self._session(d.untuned)

    async def _search_step(self, d: SearchStep) -> None:
        """One search step; a SessionLost reopens every beam's sessions and retries once."""
        if self.search is not None and self.search != d and self.state.beams:
            await self._resolve_beams()  # the search changed shape: settle the old one first
            if self.state.done:
                return
        self.search = d
        try:
            await self._search_step_once(d)
        except SessionLost:
            log.warning("search_session_lost")
            await self._reopen_search(d)
            await self._search_step_once(d)

    async def _search_step_once(self, d: SearchStep) -> None:
        """Expand the live beams K ways (W*K from the committed sequence on the first step),
        sample one chunk each from the proposer, score it with the guide pair, keep the best W.
        A chunk is scored on its own against the parent's guide sessions (child score =
        parent score + chunk log-ratio), so a step costs O(L) per child, not O(length)."""
        state = self.state
        prop, tuned, untuned = self._search_sessions(d)
        if not state.beams:
            await _gather_all(prop.sync(), tuned.sync(), untuned.sync())
            root = Beam(beam_id=-1, chunks=(), score=0.0, finished=False)
            self.beam_sessions[-1] = (prop.session_id, tuned.session_id, untuned.session_id)
            parents, per_parent = [root], d.width * d.successors
        else:
            parents, per_parent = [b for b in state.beams if not b.finished], d.successors
        carried = [b for b in state.beams if b.finished]
        created: list[tuple[SessionModel, str]] = []  # every session forked in this step
        first_child_id = self.next_beam_id
        try:
            expanded = await _gather_all(
                *(self._expand(d, p, i, per_parent, created) for i, p in enumerate(parents))
            )
            children = [(p, *c) for p, cs in zip(parents, expanded, strict=True) for c in cs]
            # Best W of the carried finished beams and the children; ties keep the earlier one.
            pool = carried + [child for _, child, _, _ in children]
            ranked = sorted(range(len(pool)), key=lambda i: (-pool[i].score, i))
            kept = [pool[i] for i in ranked[: d.width]]
            kept_ids = {b.beam_id for b in kept}
            await _gather_all(
                *(
                    self._child_guides(parent, child, chunk, sid, tuned, untuned, created)
                    for parent, child, chunk, sid in children
                    if child.beam_id in kept_ids
                )
            )
        except BaseException:
            for beam_id in [b for b in self.beam_sessions if b >= first_child_id]:
                del self.beam_sessions[beam_id]
            await _close_all(created)
            raise
        to_close = [(prop.model, sid) for _, c, _, sid in children if c.beam_id not in kept_ids]
        for parent in parents:  # replaced by their children; the root's sessions are the models'
            if parent.beam_id != -1:
                to_close += self._beam_refs(parent.beam_id)
        self.beam_sessions.pop(-1, None)
        await _close_all(to_close)
        state.beams = kept
        self._commit_common_prefix()
        if all(b.finished for b in state.beams):
            await self._resolve_beams()

    async def _expand(
        self,
        d: SearchStep,
        parent: Beam,
        p_index: int,
        n: int,
        created: list[tuple[SessionModel, str]],
    ) -> list[tuple[Beam, Segment, str]]:
        """n children of one beam: fork, sample a chunk each (batched by the engine), score."""
        state = self.state
        prop, tuned, untuned = self._search_sessions(d)
        p_sid, t_sid, u_sid = self.beam_sessions[parent.beam_id]
        room = state.tokens_left - parent.num_tokens
        child_sids = await prop.model.fork(p_sid, n)
        created += [(prop.model, sid) for sid in child_sids]
        gens = await _gather_all(
            *(
                prop.model.generate(
                    sid,
                    self._params(
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
        out = []
        for chunk, ratio, sid in zip(chunks, ratios, child_sids, strict=True):
            finished = chunk.model_finish in ("eos", "stop") or len(chunk.token_ids) >= room
            score = parent.score + ratio
            child = Beam(self.next_beam_id, parent.chunks + (chunk,), score, finished)
            self.next_beam_id += 1
            out.append((child, chunk, sid))
        return out

    async def _chunk_log_ratio(
        self, tuned: _ModelSession, untuned: _ModelSession, t_sid: str, u_sid: str, c: Segment
    ) -> float:
        lp_t, lp_u = await _gather_all(
            tuned.model.score(t_sid, self._guide_ids(tuned, [c])),
            untuned.model.score(u_sid, self._guide_ids(untuned, [c])),
        )
        return float(sum(lp_t) - sum(lp_u))

    def _guide_ids(self, guide: _ModelSession, chunks: list[Segment]) -> list[int]:
        """A guide's ids for proposer chunks; text for a foreign tokenizer, with the guide's
        own end token after a finished response (the proposer's eos is not in the text)."""
        ids = guide.ids_for(chunks)
        last = chunks[-1] if chunks else None
        if (
            last is not None
            and last.model_finish == "eos"
            and guide.info.eos_token_ids
            and self.coord.infos[last.model].tokenizer_fingerprint
            != guide.info.tokenizer_fingerprint
        ):
            ids.append(guide.info.eos_token_ids[0])
        return ids

    async def _child_guides(
        self,
        parent: Beam,
        child: Beam,
        chunk: Segment,
        prop_sid: str,
        tuned: _ModelSession,
        untuned: _ModelSession,
        created: list[tuple[SessionModel, str]],
    ) -> None:
        """Guide sessions of a kept child: its parent's, forked, plus the child's chunk."""
        _, t_sid, u_sid = self.beam_sessions[parent.beam_id]

        async def fork_append(ms: _ModelSession, sid: str) -> str:
            (new,) = await ms.model.fork(sid, 1)
            created.append((ms.model, new))
            await ms.model.append(new, self._guide_ids(ms, [chunk]))
            return new

        t_new, u_new = await _gather_all(fork_append(tuned, t_sid), fork_append(untuned, u_sid))
        self.beam_sessions[child.beam_id] = (prop_sid, t_new, u_new)

    def _beam_refs(self, beam_id: int) -> list[tuple[SessionModel, str]]:
        """Forget a beam's sessions; return them for closing."""
        sids = self.beam_sessions.pop(beam_id, None)
        if sids is None or self.search is None:
            return []
        models = (self.coord.models[n] for n in decision_models(self.search))
        return list(zip(models, sids, strict=True))

    async def _reopen_search(self, d: SearchStep) -> None:
        """Rebuild every live beam's sessions from the state (prompt + segments + its chunks)."""
        refs: list[tuple[SessionModel, str]] = []
        for beam_id in [b for b in self.beam_sessions if b != -1]:
            refs += self._beam_refs(beam_id)
        self.beam_sessions.clear()
        trio = self._search_sessions(d)
        for ms in trio:
            if ms.session_id is not None:  # reopened by the next sync
                refs.append((ms.model, ms.session_id))
                ms.session_id = None
        await _close_all(refs)

        async def open_beam(beam: Beam) -> None:
            sids = await _gather_all(*(ms.open_detached(beam.chunks) for ms in trio))
            self.beam_sessions[beam.beam_id] = tuple(sids)

        await _gather_all(*(open_beam(b) for b in self.state.beams))

    def _commit_common_prefix(self) -> None:
        """Chunks every live beam shares can no longer change: commit and stream them."""
        beams = self.state.beams
        n = 0
        while all(len(b.chunks) > n and b.chunks[n] is beams[0].chunks[n] for b in beams):
            n += 1
        if n == 0:
            return
        for chunk in beams[0].chunks[:n]:
            self._commit(chunk)
        self.state.beams = [replace(b, chunks=b.chunks[n:]) for b in beams]

    async def _resolve_beams(self) -> None:
        """End a search: commit the best beam's chunks and make its sessions the models' own."""
        state = self.state
        if not state.beams or self.search is None:
            return
        best = max(state.beams, key=lambda b: b.score)  # the first of equals wins
        for chunk in best.chunks:
            self._commit(chunk)
        to_close: list[tuple[SessionModel, str]] = []
        for b in state.beams:
            if b is not best:
                to_close += self._beam_refs(b.beam_id)
        best_sids = self.beam_sessions.pop(best.beam_id)
        for ms, sid in zip(self._search_sessions(self.search), best_sids, strict=True):
            if ms.session_id is not None:
                to_close.append((ms.model, ms.session_id))
            ms.session_id, ms.synced = sid, len(state.segments)
        state.beams = []
        await _close_all(to_close)

    # ----- end of request ----------------------------------------------------------------

    async def close_sessions(self) -> None:
        refs = [(ms.model, ms.session_id) for ms in self.sessions.values() if ms.session_id]
        for ms in self.sessions.values():
            ms.session_id = None
        for beam_id in [b for b in self.beam_sessions if b != -1]:
            refs += self._beam_refs(beam_id)
        self.beam_sessions.clear()
        await _close_all(refs)

    def _usage(self) -> Usage:
        by_model: dict[str, int] = {}
        for seg in self.state.segments:
            by_model[seg.model] = by_model.get(seg.model, 0) + len(seg.token_ids)
        return Usage(
            prompt_tokens=len(self.prompt_ids(self.state.models[0])),
            completion_tokens=sum(by_model.values()),
            tokens_by_model=by_model,
        )

    def result(self) -> GenerationResult:
        return GenerationResult(
            request_id=self.state.request_id,
            text=self.state.text,
            segments=tuple(self.state.segments),
            finish_reason=self.state.finish_reason or "policy",
            usage=self._usage(),
            policy=self.policy.name,
            policy_version=self.policy.version,
        )

    def turn_records(self) -> list[Record]:
        records: list[Record] = []
        for i, seg in enumerate(self.state.segments):
            decision = self.decisions.get(seg.turn)
            timing = self.timings.get(seg.turn, _Timing())
            records.append(
                TurnRecord(
                    request_id=self.state.request_id,
                    turn=seg.turn,
                    segment=i,
                    policy=self.policy.name,
                    policy_version=self.policy.version,
                    decision=_decision_fields(decision),
                    model=seg.model,
                    segment_kind=seg.kind,
                    token_ids=seg.token_ids,
                    text=seg.text,
                    logprobs=seg.logprobs,
                    model_finish=seg.model_finish,
                    policy_ms=timing.policy_ms,
                    model_ms=timing.model_ms,
                    wall_ms=timing.wall_ms,
                    time=self.commit_times[i],
                )
            )
        return records


def _decision_fields(decision: Decision | None) -> dict[str, str | int | float | bool | None]:
    if decision is None:
        return {}
    return {"kind": decision.kind, **asdict(decision)}


async def _gather_all(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but waits for every awaitable before raising the first error, so
    no call is still creating sessions while the caller cleans up after a failure."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


async def _close_all(refs: list[tuple[SessionModel, str]]) -> None:
    """Close sessions; a failure to close one (its replica is gone) is not an error."""
    results = await asyncio.gather(*(m.close(sid) for m, sid in refs), return_exceptions=True)
    for r in results:
        if isinstance(r, Exception):
            log.warning("session_close_failed", error=repr(r))
