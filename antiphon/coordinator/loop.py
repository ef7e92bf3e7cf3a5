"""The turn loop as a plain async class with no Ray in it.

    coordinator = Coordinator(models={"a": engine_a, "b": engine_b},
                              tokenizers={"a": tok_a, "b": tok_b}, turn_sink=sink)
    async for event in coordinator.run(request):     # SegmentEvent ..., then one FinishEvent
        print(event)
    result = await coordinator.generate(request)     # or all at once

`models` are anything implementing `SessionModel` (the in-process engine, or the Serve
client); the deployment in `antiphon.coordinator.deployment` wraps this class unchanged.

A turn is three calls, then the segments that can no longer change are streamed:

    decision = await decide(policy, state.view())         # antiphon.policies.base
    outcome = await executor.run(decision, state)          # antiphon.coordinator.executors
    state = apply(state, outcome, trim)                    # antiphon.coordinator.commit

An executor with work pending (a search's beams) is settled before a decision of another kind
runs, and when the budget is spent. The turn records (each with the version its decision
carries) go to the turn sink in one batch when the request ends. Log lines carry the
`request_id`, and during a turn the `turn`.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from antiphon.actors.protocol import SessionModel
from antiphon.coordinator.commit import apply, release, tokenizer_trim
from antiphon.coordinator.executors import ExecutionContext, Executor, make_executor
from antiphon.coordinator.records import Record, TurnSink, TurnTiming, request_record, turn_records
from antiphon.coordinator.request import (
    FinishEvent,
    GenerationRequest,
    GenerationResult,
    StreamEvent,
    Usage,
)
from antiphon.coordinator.sessions import RequestSessions
from antiphon.errors import InvalidRequest, NotFound
from antiphon.logging import get_logger, log_context
from antiphon.messages import ModelInfo
from antiphon.policies.base import Decision, Policy, decide
from antiphon.policies.registry import PolicyCache, PolicyResolver
from antiphon.sequence import SequenceState, SequenceStatus

log = get_logger(__name__)


class Coordinator:
    """Runs requests over a fixed set of models. Safe to share between concurrent requests."""

    def __init__(
        self,
        models: Mapping[str, SessionModel],
        tokenizers: Mapping[str, PreTrainedTokenizerBase],
        *,
        resolve_policy: PolicyResolver | None = None,
        turn_sink: TurnSink | None = None,
        close_in_background: bool = False,
    ) -> None:
        missing = sorted(set(models) - set(tokenizers))
        if missing:
            raise ValueError(f"no tokenizer for models {missing}")
        self.models = dict(models)
        self.tokenizers = dict(tokenizers)
        self.resolve_policy = resolve_policy or PolicyCache()
        self.turn_sink = turn_sink
        # True (the Serve deployment, whose event loop outlives requests): a request's
        # sessions are closed and its records sent by a task after its last event, so the
        # response does not wait for them; `drain()` waits. False: before the last event
        # returns (an `asyncio.run` per request would cancel such a task).
        self.close_in_background = close_in_background
        self._endings: set[asyncio.Task] = set()  # background request endings under way
        self.infos: dict[str, ModelInfo] = {}  # fetched once per model, on first use
        self.trim = tokenizer_trim(self.tokenizers)

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

    async def drain(self) -> None:
        """Wait until every finished request's sessions are closed and its records sent."""
        while self._endings:
            await asyncio.gather(*list(self._endings), return_exceptions=True)

    async def _start(self, request: GenerationRequest) -> _Run:
        unknown = [m for m in request.models if m not in self.models]
        if unknown:
            raise NotFound(f"unknown model(s) {unknown}; known models: {sorted(self.models)}")
        policy = self.resolve_policy(request.policy, request.policy_params, request.models)
        todo = [n for n in request.models if n not in self.infos]
        if todo:
            infos = await asyncio.gather(*(self.models[n].info() for n in todo))
            self.infos.update(zip(todo, infos, strict=True))
        run = _Run(self, request, policy)
        await run.sessions.encode_prompt(request.models)
        return run

    async def _drive(self, run: _Run) -> AsyncIterator[StreamEvent]:
        error: BaseException | None = None
        try:
            with log_context(request_id=run.state.request_id):
                async for event in run.turns():
                    yield event
        except BaseException as e:  # also cancel / generator close: log, close, re-raise
            error = e
            run.state = run.state.failed()
            raise
        finally:
            if self.close_in_background:
                # An empty context: the ending is not a child of the request's Ray task, so
                # a cancelled stream does not cancel its session closes and records with it
                # (an actor call cancelled before it is sent also stalls that actor's queue).
                task = contextvars.Context().run(asyncio.create_task, self._end(run, error))
                self._endings.add(task)
                task.add_done_callback(self._ended)
            else:
                await self._end(run, error)

    async def _end(self, run: _Run, error: BaseException | None) -> None:
        """After a request's last event: close its sessions, send its records."""
        await run.sessions.close_all()
        if self.turn_sink is None:
            return
        try:
            await self.turn_sink.write(run.records(error))
        except Exception:  # the response is already out; losing a log batch must not fail it
            log.exception("turn_log_write_failed", request_id=run.state.request_id)

    def _ended(self, task: asyncio.Task) -> None:
        self._endings.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("request_ending_failed", error=repr(task.exception()))


class _Run:
    """One request in flight: its state, its sessions and executors, what it decided."""

    def __init__(self, coord: Coordinator, request: GenerationRequest, policy: Policy) -> None:
        self.request = request
        self.policy = policy
        self.trim = coord.trim
        self.state = request.initial_state()
        self.sessions = RequestSessions(coord.models, coord.tokenizers, coord.infos, request.prompt)
        self.ctx = ExecutionContext(request, self.sessions, coord.trim)
        self.executors: dict[type, Executor] = {}  # one per kind of decision, made on first use
        self.active: Executor | None = None  # ran the last decision; may hold pending work
        self.released = len(request.resume)  # segments already streamed (by a replica that died)
        self.decisions: dict[int, Decision] = {}  # per turn
        self.timings: dict[int, TurnTiming] = {}  # per turn
        self.commit_times = [time.time()] * len(request.resume)  # per segment (resumed: now)

    async def turns(self) -> AsyncIterator[StreamEvent]:
        self.state = replace(self.state, status=SequenceStatus.RUNNING)
        while not self.state.done:
            if self.state.tokens_left == 0:
                await self._settle()
                self._commit(self.state.finished("length"))
                break
            t0 = time.perf_counter()
            turn = self.state.turn
            with log_context(turn=turn):  # on every log line of this turn
                decision = await decide(self.policy, self.state.view())
                t1 = time.perf_counter()
                self._check(decision)
                self.decisions[turn] = decision
                await self._execute(decision)
                t2 = time.perf_counter()
            self.state = replace(self.state, turn=turn + 1)
            for event in self._release():
                yield event
            wall = time.perf_counter() - t0
            self.timings[turn] = TurnTiming((t1 - t0) * 1e3, (t2 - t1) * 1e3, wall * 1e3)
        for event in self._release():
            yield event
        yield FinishEvent(
            self.state.request_id, self.state.finish_reason or "policy", self._usage()
        )

    def _check(self, decision: Decision) -> None:
        for name in decision.models():
            if name not in self.state.models:
                raise InvalidRequest(
                    f"policy {self.policy.name!r} chose model {name!r}, which is not in the "
                    f"ensemble {list(self.state.models)}"
                )

    async def _execute(self, decision: Decision) -> None:
        """Run the decision with the executor of its kind, and apply the outcome."""
        executor = self.executors.get(type(decision))
        if executor is None:
            executor = self.executors[type(decision)] = make_executor(decision, self.ctx)
        if self.active is not None and self.active is not executor:
            await self._settle()  # another kind of decision ends pending work
        self.active = executor
        if not self.state.done:
            outcome = await executor.run(decision, self.state)
            self._commit(apply(self.state, outcome, self.trim))

    async def _settle(self) -> None:
        if self.active is not None:
            self._commit(apply(self.state, await self.active.settle(self.state), self.trim))

    def _commit(self, state: SequenceState) -> None:
        """Take the new state; segments it added get this moment as their commit time
        (segments cut at a stop string keep theirs)."""
        kept = min(len(self.state.segments), len(state.segments))
        self.commit_times = self.commit_times[:kept]
        self.commit_times += [time.time()] * (len(state.segments) - kept)
        self.state = state

    def _release(self) -> list:
        events, self.released = release(self.state, self.released)
        return events

    def _usage(self) -> Usage:
        prompt_ids = self.sessions.prompt_ids(self.state.models[0])
        return Usage.of(self.state.segments, prompt_tokens=len(prompt_ids))

    def _last_version(self) -> str:
        return self.decisions[max(self.decisions)].version if self.decisions else ""

    def result(self) -> GenerationResult:
        return GenerationResult.of(
            self.state, self._usage(), self.policy.name, self._last_version()
        )

    def records(self, error: BaseException | None) -> list[Record]:
        """The request's turn records, then its request record."""
        s, name, infos = self.state, self.policy.name, self.sessions.infos
        turns = turn_records(s, name, self.decisions, self.timings, self.commit_times, infos)
        params = self.request.policy_params
        return [*turns, request_record(s, name, self._last_version(), params, error)]
