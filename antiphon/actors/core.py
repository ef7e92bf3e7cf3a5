"""The engine core: the worker thread's side of `ModelEngine`, one step at a time.

It owns every session (`SessionTable`), the model (`ModelRunner`) and the output processing
(`OutputProcessor`); only its thread touches them. Each step:

1. admit: take new calls off the inbox and queue them on their session; at each session's
   head, complete what needs no model (fork, truncate, close, an append with nothing left to
   feed) and do a call's one-time work (append a generate's prefix, take a cached prefix that
   another session shares);
2. `plan = schedule(candidates)` (pure, `antiphon.actors.scheduler`);
3. `runner.decode(rows)` or `runner.prefill(rows)`;
4. update from the output: tokens into sessions, finished calls resolved.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import torch

from antiphon.actors.calls import (
    IMMEDIATE,
    Append,
    Call,
    Close,
    Fork,
    Generate,
    Op,
    Open,
    Score,
    Truncate,
)
from antiphon.actors.grammar import GrammarMatcher, GrammarTokenizer
from antiphon.actors.logits import logits_processors
from antiphon.actors.outputs import (
    OutputProcessor,
    candidate_logprobs,
    teacher_forced,
    token_logprobs,
)
from antiphon.actors.runner import ModelRunner, Row
from antiphon.actors.sampling import new_generator
from antiphon.actors.scheduler import Candidate, schedule
from antiphon.actors.sessions import Session, SessionTable
from antiphon.config import ModelSpec
from antiphon.errors import AntiphonError, InvalidRequest, Overloaded, PromptTooLong
from antiphon.messages import SessionInfo, as_token_ids

IDLE_WAKE_S = 1.0  # how often an idle worker wakes to expire sessions


class EngineCore:
    """Sessions, scheduling, forward passes and outputs of one checkpoint; run by one thread."""

    def __init__(
        self,
        spec: ModelSpec,
        runner: ModelRunner,
        outputs: OutputProcessor,
        tokenizer: Any,
        vocab_size: int,
        id_prefix: str = "",
    ) -> None:
        self.spec = spec
        self.runner = runner
        self.outputs = outputs
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_context = runner.max_context
        self.table = SessionTable(
            spec.name, spec.max_sessions, spec.max_cached_tokens, spec.session_idle_timeout_s,
            id_prefix, spec.prefix_reuse,
        )  # fmt: skip
        self.inbox: queue.SimpleQueue[Call | None] = queue.SimpleQueue()  # None: wake up
        self.stopping = False
        self.tokens_generated = 0  # tokens written by generate since start
        self._last_step_decoded = False
        self._generate_seq = 0
        self._grammar_tokenizer: GrammarTokenizer | None = None  # built on the first grammar

    # -- the loop and admission -------------------------------------------------------------

    def run(self) -> None:
        """Serve calls until `stopping`; then fail whatever is still waiting."""
        try:
            with torch.inference_mode():
                while not self.stopping:
                    self._admit(block=not self.table.has_calls())
                    self.table.expire_idle()
                    if not self.stopping:
                        self.step()
        finally:
            self._fail_everything(Overloaded(f"engine {self.spec.name!r} stopped"))

    def _fail_everything(self, error: AntiphonError) -> None:
        for session in self.table.live.values():
            for call in session.calls:
                call.resolve(error=error)
            session.calls.clear()
        while True:
            try:
                call = self.inbox.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call.resolve(error=error)

    def _admit(self, block: bool) -> None:
        """Take new calls off the inbox: validate them and queue them on their session."""
        try:
            call = self.inbox.get(timeout=IDLE_WAKE_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while call is not None:
            self.table.expire_idle()
            try:
                self._accept(call)
            except Exception as e:  # typed errors, or a tokenizer choking on odd text
                call.resolve(error=e)
            try:
                call = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, call: Call) -> None:
        op = call.op
        if isinstance(op, Generate):
            self._generate_seq += 1
            op.seq = self._generate_seq
        if isinstance(op, Open) or (isinstance(op, Generate) and op.session_id is None):
            session = self._new_session(op)
        elif isinstance(op, Close) and op.session_id not in self.table.live:
            call.resolve(None)  # closing an unknown session is not an error
            return
        else:
            session = self.table.lookup(op.session_id)
            self.table.touch(session)
        session.calls.append(call)

    def _new_session(self, op: Open | Generate) -> Session:
        if isinstance(op, Open):
            ids = self._encode(op.prompt) if isinstance(op.prompt, str) else op.prompt
        else:  # open + generate: the prefix is the prompt
            ids, op.prefix_ids = op.prefix_ids, []
        if not ids:
            raise InvalidRequest("prompt is empty: a session needs at least one token")
        if len(ids) > self.max_context:
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens, model {self.spec.name!r} reads at most "
                f"{self.max_context}"
            )
        if isinstance(op, Generate) and len(ids) == self.max_context:
            # refused before the session exists: its id would never reach the caller
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens, the whole context of model "
                f"{self.spec.name!r}: no room to generate"
            )
        self.table.make_room(new_tokens=len(ids), new_sessions=1)
        session = self.table.new(list(ids), kv=[], n_cached=0)
        if isinstance(op, Generate):
            op.session_id = session.session_id
        return session

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return as_token_ids(list(ids), self.vocab_size, "prompt")

    # -- the head of a session's queue -----------------------------------------------------

    def _advance(self, session: Session) -> Row | None:
        """Complete the head calls that need no model; return the forward row of the first
        one that does (None if none does)."""
        while session.calls and session.session_id in self.table.live:
            call = session.calls[0]
            try:
                if not call.started:
                    call.started = True
                    if isinstance(call.op, IMMEDIATE):
                        self._immediate(session, call)
                        continue
                    self._start(session, call.op)
                row = self._row(session, call)
            except Exception as e:  # typed errors of bad requests; the session is unharmed
                if session.calls and session.calls[0] is call:
                    session.calls.popleft()
                call.resolve(error=e)
                continue
            if row is not None:
                return row
            # fed all it had to (open, append) or has nothing to score
            done = [] if isinstance(call.op, Score) else SessionInfo(*self._info_of(session))
            self._complete(session, call, done)
        return None

    def _immediate(self, session: Session, call: Call) -> None:
        op = call.op
        if isinstance(op, Fork):
            children = self.table.fork(session, op.n, op.length)
            self._complete(session, call, [c.session_id for c in children])
        elif isinstance(op, Truncate):
            self.table.truncate(session, op.length)
            self._complete(session, call, SessionInfo(*self._info_of(session)))
        else:  # Close. Forget first: a caller that sees close return must see it gone.
            session.calls.popleft()
            self.table.close(session)
            call.resolve(None)

    def _start(self, session: Session, op: Op) -> None:
        """A call's one-time work when it reaches the head: put its tokens in the session
        (not yet fed), then take any cached prefix another session shares with it."""
        if isinstance(op, Generate):
            length = len(session.token_ids) + len(op.prefix_ids)
            if length >= self.max_context:  # checked first: a refused call changes nothing
                with_prefix = f" + {len(op.prefix_ids)} prefix tokens" if op.prefix_ids else ""
                raise PromptTooLong(
                    f"session {session.session_id!r} holds {len(session.token_ids)} tokens"
                    f"{with_prefix}, the whole context ({self.max_context}) of model "
                    f"{self.spec.name!r}: no room to generate"
                )
            # before the prefix goes in: a grammar the text breaks refuses the call unharmed
            ids = session.token_ids + op.prefix_ids if op.params.reads_response else []
            op.processors = logits_processors(op.params, ids, self._grammar)
            self.table.grow(session, op.prefix_ids, self.max_context)
            op.prefix_ids = []
            if op.params.samples:  # greedy calls draw nothing
                op.generator = new_generator(op.params.seed)
        elif isinstance(op, Append) or (isinstance(op, Score) and op.candidate_ids is not None):
            self.table.grow(session, op.token_ids, self.max_context)
            op.token_ids = []
        elif isinstance(op, Score) and op.keep:
            # No prefix reuse: a cache another session shares could cover the tokens being
            # scored, and their log-probs need their positions fed here.
            self.table.grow(session, op.token_ids, self.max_context)
            return
        elif isinstance(op, Score) and (
            len(session.token_ids) + len(op.token_ids) > self.max_context
        ):
            raise PromptTooLong(
                f"scoring {len(op.token_ids)} tokens after session {session.session_id!r} "
                f"({len(session.token_ids)} tokens) exceeds the context of {self.max_context}"
            )
        self.table.reuse_prefix(session)

    def _grammar(self, grammar: str, response_ids: list[int]) -> GrammarMatcher:
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = GrammarTokenizer(self.tokenizer, self.vocab_size)
        return self._grammar_tokenizer.matcher(grammar, response_ids)

    def _row(self, session: Session, call: Call) -> Row | None:
        """What the head call feeds in its next pass (None: nothing, it is done)."""
        op = call.op
        pending = session.token_ids[session.n_cached :]
        if isinstance(op, Generate):
            return Row(session, call, pending, len(pending), [len(pending) - 1])
        if isinstance(op, Open | Append):
            to_feed = pending[:-1]  # the last token stays pending
            return Row(session, call, to_feed, len(to_feed), []) if to_feed else None
        if op.candidate_ids is not None:  # the next-token distribution after the session
            return Row(session, call, pending, len(pending) - 1, [len(pending) - 1])
        if not op.token_ids:
            return None
        if op.keep:  # the tokens are in the session already: fed and kept like an append's
            to_feed = pending[:-1]
            first = len(pending) - len(op.token_ids) - 1  # predicts the first scored token
            return Row(session, call, to_feed, len(to_feed), list(range(first, len(to_feed))))
        first = len(pending) - 1  # its logits predict the first scored token
        positions = list(range(first, first + len(op.token_ids)))
        return Row(session, call, pending + op.token_ids, len(pending) - 1, positions)

    def _complete(self, session: Session, call: Call, result: Any) -> None:
        session.calls.popleft()
        session.last_used = time.monotonic()
        call.resolve(result)

    def _info_of(self, session: Session) -> tuple[str, int]:
        return session.session_id, len(session.token_ids)

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> None:
        """Admit at every head, then one forward pass over the planned rows."""
        rows = {}
        for session in self.table.busy():
            row = self._advance(session)
            if row is not None:
                rows[session.session_id] = row
        plan = schedule(
            [self._candidate(key, row) for key, row in rows.items()],
            last_step_decoded=self._last_step_decoded,
            max_batch=self.spec.max_batch_size,
        )
        if plan is None:
            return
        self._last_step_decoded = plan.decode
        chosen = [rows[key] for key in plan.keys]
        try:
            if plan.decode:
                logits, hidden = self.runner.decode(chosen)
                if self._take_tokens(chosen, logits, hidden):
                    self.runner.drop_decode_batch()
            else:
                self._read_prefill(chosen, self.runner.prefill(chosen))
        except Exception as e:  # a forward pass failed (e.g. out of memory): drop its sessions
            self.runner.drop_decode_batch(keep_caches=False)
            for row in chosen:
                if row.session.calls and row.session.calls[0] is row.call:
                    row.session.calls.popleft()
                    row.call.resolve(error=e)
                self.table.forget(row.session, f"lost in a failed forward pass ({e!r})")

    def _candidate(self, key: str, row: Row) -> Candidate:
        op = row.call.op
        is_generate = isinstance(op, Generate)
        return Candidate(
            key=key,
            decode=is_generate and len(row.tokens) == 1,
            tokens=len(row.tokens),
            seq=op.seq if is_generate else 0,
            batch_slot=self.runner.batch_slot(row.session),
        )

    def _read_prefill(self, rows: list[Row], outs: list) -> None:
        """Score calls complete here; generate calls take their first token."""
        generating = []
        for row, (logits, hidden) in zip(rows, outs, strict=True):
            op = row.call.op
            if isinstance(op, Generate):
                generating.append((row, logits[-1:], None if hidden is None else hidden[-1:]))
            elif isinstance(op, Score) and op.candidate_ids is not None:
                self._complete(row.session, row.call, candidate_logprobs(logits, op.candidate_ids))
            elif isinstance(op, Score) and op.with_argmax:
                self._complete(
                    row.session, row.call, teacher_forced(logits, op.token_ids, op.top_k)
                )
            elif isinstance(op, Score):
                self._complete(row.session, row.call, token_logprobs(logits, op.token_ids))
            # open/append: nothing to read; the call completes once nothing is left to feed
        if generating:
            hidden = [h for _, _, h in generating]
            self._take_tokens(
                [r for r, _, _ in generating],
                torch.cat([lg for _, lg, _ in generating]),
                None if hidden[0] is None else torch.cat(hidden),
            )

    def _take_tokens(self, rows: list[Row], logits: torch.Tensor, hidden: Any) -> bool:
        """Each generate row's next token into its session; True if any call ended."""
        ops = [row.call.op for row in rows]
        lengths = [len(row.session.token_ids) for row in rows]
        steps = self.outputs.next_tokens(ops, lengths, logits, hidden)
        ended = False
        for row, op, step in zip(rows, ops, steps, strict=True):
            session = row.session
            if step.token is None:
                self.runner.unfeed_last(session)
            else:
                self.table.add_written(session, step.token)
                self.tokens_generated += 1
            if step.finish is not None:
                ended = True
                result = self.outputs.generation(
                    op, step, session.session_id, len(session.token_ids), row.call.computed
                )
                self._complete(session, row.call, result)
        self.table.make_room(0, 0, strict=False)
        return ended
