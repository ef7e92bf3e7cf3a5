"""The session-keeping inference engine for one checkpoint; runs without Ray.

    engine = ModelEngine(ModelSpec(name="base", path="zoo:base"))
    s = await engine.open("Once upon")
    g = await engine.generate(s.session_id, SamplingParams(max_new_tokens=16))
    g = await engine.generate(s.session_id, params, prefix_ids=other_ids)  # append + generate
    g = await engine.generate(None, params, prefix_ids=prompt_ids)  # open + generate
    await engine.shutdown()

A session's last token is pending (see `antiphon.actors.sessions`): `open` and `append` feed
their tokens but the last, `generate` feeds the pending token and one position per new token
(leaving its last pending), `score` feeds the pending token plus the continuation and drops
the continuation's cache. No call feeds a token twice (Generation.new_tokens_computed counts),
and a session that shares a prefix with a live or recently closed one starts from its cache.
`generate` with `prefix_ids` appends them first and feeds them in the same pass as the pending
token, so "append then generate" is one call and one pass. `fork` shares the parent's cache;
`truncate` keeps a view of the first positions.

One worker thread is the only caller of the model. The async methods hand a `Call` to it
through a thread-safe queue and await a future it resolves; the event loop (the Serve
replica's) never runs the model. Calls of one session run in order; calls of different
sessions run side by side. Each step of the worker is the vLLM v1 step:

1. admit: take new calls, and at each session's head complete what needs no model (fork,
   truncate, close, an append with nothing to feed) and do a call's one-time work (append a
   generate's prefix, take a shared prefix's cache);
2. `plan = schedule(candidates)` (`antiphon.actors.scheduler`, pure);
3. `runner.decode(rows)` or `runner.prefill(rows)` (`antiphon.actors.runner`);
4. update from the output (`antiphon.actors.outputs`: gate, sample, stop): tokens into
   sessions, finished calls resolved.

Bounds (`antiphon.actors.sessions`): spec.max_sessions and spec.max_cached_tokens, kept by
evicting least recently used idle sessions; idle sessions expire; a call on a session that is
gone raises SessionLost naming why. A stop string cuts the text where it starts; the token ids
(and the session) keep every token up to the one that completed it. Not done: chunked prefill,
and models with sliding-window or linear attention layers (see `antiphon.actors.kv`).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedModel

from antiphon.actors.calls import Append, Call, Close, Fork, Generate, Op, Open, Score, Truncate
from antiphon.actors.core import EngineCore
from antiphon.actors.gate import GateSource, find_gate
from antiphon.actors.outputs import OutputProcessor
from antiphon.actors.runner import ModelRunner
from antiphon.checkpoint import checkpoint_facts, load_checkpoint
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest
from antiphon.messages import (
    Generation,
    ModelInfo,
    SamplingParams,
    SessionInfo,
    TeacherForced,
    as_token_ids,
)


@dataclass(frozen=True)
class EngineStats:
    """Counters of one engine, for metrics and benchmarks."""

    live_sessions: int  # sessions held now
    cached_tokens: int  # tokens held by sessions now (their caches hold all but the last)
    tokens_generated: int  # tokens written by generate since start
    forward_passes: int  # model forward calls since start (a batched call counts once)
    forward_tokens: int  # positions the model ran on since start, pads not counted
    reused_tokens: int  # cached positions taken from another session's cache since start


class ModelEngine:
    """One checkpoint's sessions, served to async callers by a batching worker thread."""

    def __init__(self, spec: ModelSpec, id_prefix: str = "") -> None:
        self.spec = spec
        model, tokenizer = load_checkpoint(spec)
        facts = checkpoint_facts(model, tokenizer)
        self.vocab_size, self.max_context = facts.vocab_size, facts.max_context
        self._gate = _gate_source(spec, model)
        runner = ModelRunner(model, self.max_context, capture_head_input=self._gate is not None)

        def decode(token_ids: list[int]) -> str:
            return tokenizer.decode(token_ids, skip_special_tokens=True)

        outputs = OutputProcessor(decode, frozenset(facts.eos_token_ids), self.max_context)
        self._core = EngineCore(spec, runner, outputs, tokenizer, self.vocab_size, id_prefix)
        self._info = ModelInfo(
            name=spec.name,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            eos_token_ids=facts.eos_token_ids,
            tokenizer_fingerprint=facts.tokenizer_fingerprint,
            device=str(runner.device),
            dtype=spec.dtype,
            gate_fingerprint=self._gate.gate.fingerprint if self._gate is not None else "",
        )
        self._crash: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name=f"engine-{spec.name}", daemon=True)
        self._worker.start()

    @property
    def model(self) -> PreTrainedModel:
        """The loaded model (the worker thread is its only caller)."""
        return self._core.runner.model

    def _run(self) -> None:
        try:
            self._core.run()
        except BaseException as e:  # a bug: the core failed everyone; check_health reports it
            self._crash = e

    # -- public async API (SessionModel) ----------------------------------------------------

    async def info(self) -> ModelInfo:
        if self._gate is not None:  # the gate served now (it may have been published since)
            self._info = replace(self._info, gate_fingerprint=self._gate.current().fingerprint)
        return self._info

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        if not isinstance(prompt, str):
            prompt = as_token_ids(prompt, self.vocab_size, "prompt")
        return await self._submit(Open(prompt))

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        ids = as_token_ids(token_ids, self.vocab_size, "token_ids")
        return await self._submit(Append(session_id, ids))

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
        prefix = as_token_ids(prefix_ids, self.vocab_size, "prefix_ids")
        as_token_ids([token for token, _ in params.logit_bias], self.vocab_size, "logit_bias")
        if session_id is None and not prefix:
            raise InvalidRequest("generate without a session needs prefix_ids: its prompt")
        gate = self._gate.current() if self._gate is not None else None
        return await self._submit(Generate(session_id, params, prefix, gate=gate))

    async def score(self, session_id: str, token_ids: list[int], keep: bool = False) -> list[float]:
        ids = as_token_ids(token_ids, self.vocab_size, "token_ids")
        return await self._submit(Score(session_id, ids, keep=bool(keep)))

    async def teacher_force(
        self, session_id: str, token_ids: list[int], top_k: int = 0
    ) -> TeacherForced:
        """`score`, and the model's argmax (and top_k most likely tokens, at most 20) at each
        of those positions; the session is unchanged."""
        ids = as_token_ids(token_ids, self.vocab_size, "token_ids")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= 20:
            raise InvalidRequest(f"top_k must be an integer in [0, 20], got {top_k!r}")
        return await self._submit(Score(session_id, ids, with_argmax=True, top_k=top_k))

    async def next_token_logprobs(self, session_id: str, candidate_ids: list[int]) -> list[float]:
        """log p(c | session) for each candidate id c; the session is unchanged."""
        ids = as_token_ids(candidate_ids, self.vocab_size, "candidate_ids")
        return await self._submit(Score(session_id, [], candidate_ids=ids))

    async def prompt_next_token_logprobs(
        self, prompt: list[int] | str, candidate_ids: list[int]
    ) -> list[float]:
        """log p(c | prompt) for each candidate id c, in one call (the learned switcher's one
        call per turn). One token opens a throwaway session and the read feeds the rest, so
        a prompt sharing a prefix with a recent one (the switcher's trace grows by a segment
        a turn) feeds only what is new, in the one pass that reads."""
        ids = as_token_ids(candidate_ids, self.vocab_size, "candidate_ids")
        if not isinstance(prompt, str):
            prompt = as_token_ids(prompt, self.vocab_size, "prompt")
        first, rest = (prompt, []) if isinstance(prompt, str) else (prompt[:1], prompt[1:])
        session = await self.open(first)
        try:
            return await self._submit(Score(session.session_id, rest, candidate_ids=ids))
        finally:
            await self.close(session.session_id)

    async def fork(self, session_id: str, n: int, length: int | None = None) -> list[str]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"fork n must be an integer >= 1, got {n!r}")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
            raise InvalidRequest(f"fork length must be an integer or None, got {length!r}")
        return await self._submit(Fork(session_id, n, length))

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InvalidRequest(f"truncate length must be an integer >= 1, got {length!r}")
        return await self._submit(Truncate(session_id, length))

    async def close(self, session_id: str) -> None:
        await self._submit(Close(session_id))

    def stats(self) -> EngineStats:
        core = self._core
        return EngineStats(
            live_sessions=len(core.table.live),
            cached_tokens=core.table.tokens_held,
            tokens_generated=core.tokens_generated,
            forward_passes=core.runner.forward_passes,
            forward_tokens=core.runner.forward_tokens,
            reused_tokens=core.table.reused_tokens,
        )

    def check_health(self) -> None:
        """Raise if the engine cannot serve: its worker died or it was shut down."""
        if self._crash is not None:
            raise RuntimeError(f"engine {self.spec.name!r} worker died: {self._crash!r}")
        if self._core.stopping or not self._worker.is_alive():
            raise RuntimeError(f"engine {self.spec.name!r} is shut down")

    def stop(self) -> None:
        """Tell the worker to stop, without waiting for it; requests still waiting fail with
        Overloaded."""
        self._core.stopping = True
        self._core.inbox.put(None)

    async def shutdown(self) -> None:
        """Stop the worker and wait for it to end."""
        self.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._worker.join)

    async def _submit(self, op: Op) -> Any:
        self.check_health()
        loop = asyncio.get_running_loop()
        call = Call(op, loop, loop.create_future())
        self._core.inbox.put(call)
        return await call.future


def _gate_source(spec: ModelSpec, model: PreTrainedModel) -> GateSource | None:
    """The checkpoint's deferral gate on the model's device, or None if it has none."""
    gate_file = find_gate(spec)
    if gate_file is None:
        return None
    if model.get_output_embeddings() is None:
        raise InvalidRequest(f"model {spec.name!r} has no output head to attach a gate to")
    hidden = model.config.get_text_config().hidden_size
    return GateSource(gate_file, hidden, next(model.parameters()).device)
