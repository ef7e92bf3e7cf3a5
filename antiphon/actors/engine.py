"""The session-keeping inference engine for one checkpoint; runs without Ray.

    engine = ModelEngine(ModelSpec(name="base", path="zoo:base"))
    s = await engine.open("Once upon")
    g = await engine.generate(s.session_id, SamplingParams(max_new_tokens=16))
    g = await engine.generate(s.session_id, params, prefix_ids=other_ids)  # append + generate
    g = await engine.generate(None, params, prefix_ids=prompt_ids)  # open + generate
    await engine.shutdown()

Sessions. A session holds its token ids and a KV cache of all of them but the last: that last
token is "pending", fed to the model by the next call that needs logits (generate, score),
which therefore always has at least one position to read logits from. So `open` and `append`
run the model on their tokens except the last; `generate` feeds the pending token and then
one position per new token (it leaves its final token pending); `score` feeds the pending
token plus the continuation and then drops the continuation's cache. Every call runs the
model only on tokens it has not seen (Generation.new_tokens_computed counts them).
`generate` with `prefix_ids` first appends them (tokens written elsewhere) and feeds them in
the same forward pass as the pending token, so "append then generate" costs one call and no
extra pass; with no session id it opens a new session whose prompt is `prefix_ids`.
`fork` gives the children the parent's cache tensors (shared, never written in place: the
cache grows by concatenation); `truncate` keeps a view of the first positions.

Threads. One worker thread is the only caller of the model: it owns all session state and
runs `_step` in a loop. The async methods hand a request to it through a thread-safe queue
and await a future that the worker resolves with `loop.call_soon_threadsafe`; the event loop
(the Serve replica's) never runs the model and stays responsive. Requests of one session
wait in that session's queue and run one after another; requests of different sessions run
side by side.

Batching. Each step runs one forward pass over up to spec.max_batch_size sessions:
- decode steps: every session whose generate call is ready for its next token (one pending
  token) joins; their caches are left-padded to one length and stacked (`kv.pack`), with a
  2D attention mask hiding the pads and explicit position ids per row. While the set of
  decoding sessions does not change, the stacked cache is kept from step to step (the model
  appends to it in place), so a steady batch pays no repacking; when a call finishes or a
  new one joins, the caches are split back per session (`kv.unpack_row`) and restacked.
- prefill steps: open, append and score requests (and any generate with several pending
  tokens) of different sessions run batched too: each row's new tokens are right-padded to
  the longest, and logits are computed only at the positions someone needs.
When both kinds wait, steps alternate between them, so long prompts do not stall decoding.
Not done: chunked prefill (a prompt is fed in one pass; rows join a prefill pass while its
padded size stays under PREFILL_TOKEN_BUDGET), and models with sliding-window or linear
attention layers (see `antiphon.actors.kv`).

Bounds. spec.max_sessions and spec.max_cached_tokens (tokens held by sessions) are kept by
evicting the least recently used idle session; sessions unused for
spec.session_idle_timeout_s are closed. A call on a session that is gone raises
SessionLost naming it and why (closed, evicted, expired).

Stop strings: the text is cut where the stop string starts; the token ids (and the session)
keep every token up to and including the one that completed it, so the session stays a
faithful record of what the model wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from antiphon.actors import kv as kvcache
from antiphon.actors.gate import GATE_FILENAME, GateHead, load_gate
from antiphon.actors.messages import (
    FinishReason,
    Generation,
    ModelInfo,
    SamplingParams,
    SessionInfo,
    as_token_ids,
)
from antiphon.actors.sampling import (
    choose_tokens,
    find_stop_string,
    new_generator,
    top_alternatives,
)
from antiphon.config import ModelSpec
from antiphon.errors import (
    AntiphonError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PromptTooLong,
    SessionLost,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFILL_TOKEN_BUDGET = 8192  # most (padded) positions one prefill step feeds, past one row
IDLE_WAKE_S = 1.0  # how often an idle worker wakes to expire sessions
PROMPT_CACHE_SIZE = 16  # sessions of recent prompt_next_token_logprobs prompts kept for reuse
PROMPT_CACHE_MIN_SHARED = 16  # shared prefix tokens that make forking a cached prompt worth it
FORGOTTEN_IDS_KEPT = 10_000  # recently gone session ids remembered to say why they are gone


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_checkpoint_path(path: str) -> str:
    """A local directory or hub id as is; 'zoo:NAME' -> the zoo checkpoint's directory."""
    if not path.startswith("zoo:"):
        return path
    name = path[len("zoo:") :]
    try:
        from antiphon.zoo import path as zoo_path
    except ImportError as e:
        raise NotFound(
            f"cannot resolve {path!r}: the zoo (antiphon.zoo.path) is unavailable"
        ) from e
    return str(zoo_path(name))


def load_checkpoint(spec: ModelSpec) -> tuple[PreTrainedModel, Any]:
    """Load spec's causal LM (safetensors only, eval mode, spec's device, dtype) and tokenizer."""
    where = resolve_checkpoint_path(spec.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            where,
            use_safetensors=True,
            trust_remote_code=spec.trust_remote_code,
            dtype=DTYPES[spec.dtype],
        )
    except OSError as e:
        raise NotFound(f"model {spec.name!r}: no loadable checkpoint at {spec.path!r} ({e})") from e
    model.to(torch.device(spec.device))
    model.eval()
    return model, tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and special tokens: equal -> ids mean the same text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps([vocab, specials], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _max_context(model: PreTrainedModel, tokenizer: Any) -> int:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return 2048


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(t) for t in source)
    return tuple(sorted(ids))


def _find_gate(spec: ModelSpec) -> Path | None:
    if spec.gate_path is not None:
        return Path(spec.gate_path)
    candidate = Path(resolve_checkpoint_path(spec.path)) / GATE_FILENAME
    return candidate if candidate.is_file() else None


# ---------------------------------------------------------------------------------------------
# State: sessions and the requests queued on them


@dataclass(frozen=True)
class EngineStats:
    """Counters of one engine, for metrics and benchmarks."""

    live_sessions: int  # sessions held now
    cached_tokens: int  # tokens held by sessions now (their caches hold all but the last)
    tokens_generated: int  # tokens written by generate since start
    forward_passes: int  # model forward calls since start (a batched call counts once)
    forward_tokens: int  # positions the model ran on since start, pads not counted


@dataclass
class _Open:
    prompt: list[int] | str


@dataclass
class _Append:
    session_id: str
    token_ids: list[int]


@dataclass
class _Generate:
    session_id: str | None  # None: open a new session whose prompt is prefix_ids
    params: SamplingParams
    prefix_ids: list[int] = field(default_factory=list)  # appended first; emptied once appended
    seq: int = 0  # arrival order; earlier generate calls get decode slots first
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    gates: list[float] = field(default_factory=list)
    computed: int = 0
    started: bool = False


@dataclass
class _Score:
    session_id: str
    token_ids: list[int]
    # None: score token_ids; else append token_ids to the session and return log p of each
    # of these as the next token after it (one forward pass for both)
    candidate_ids: list[int] | None = None


@dataclass
class _Fork:
    session_id: str
    n: int
    length: int | None = None  # the children hold the parent's first `length` tokens (None: all)


@dataclass
class _Truncate:
    session_id: str
    length: int


@dataclass
class _Close:
    session_id: str


_Op = _Open | _Append | _Generate | _Score | _Fork | _Truncate | _Close


@dataclass
class _Call:
    """One awaited request: the operation and where to deliver its result."""

    op: _Op
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    computed: int = 0  # positions fed for this call so far

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        def deliver() -> None:
            if self.future.done():
                return  # the caller gave up (cancelled)
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:
            pass  # the caller's event loop is closed: nobody is waiting


@dataclass(eq=False)  # compared by identity
class _Session:
    session_id: str
    token_ids: list[int]
    kv: kvcache.SessionKV  # cache of token_ids[:n_cached]; stale while in the decode batch
    n_cached: int
    last_used: float
    calls: deque[_Call] = field(default_factory=deque)  # head runs; the rest wait their turn


@dataclass
class _Row:
    """One session's part of a forward pass."""

    session: _Session
    call: _Call
    tokens: list[int]  # fed this step
    keep: int  # of those, how many stay in the session's cache
    logit_positions: list[int]  # indices into tokens whose next-token logits are needed


@dataclass
class _DecodeBatch:
    """Stacked caches of the sessions decoding together, kept while the set is unchanged."""

    sessions: list[_Session]
    cache: Any  # DynamicCache (B, H, L, D) per layer
    pads: list[int]  # left pad positions per row
    mask: torch.Tensor | None  # (B, L) 1 = real position; None when nothing is padded


# ---------------------------------------------------------------------------------------------
# The engine


class ModelEngine:
    """One checkpoint's sessions, served to async callers by a batching worker thread."""

    def __init__(self, spec: ModelSpec, id_prefix: str = "") -> None:
        self.spec = spec
        self.id_prefix = id_prefix
        self.model, self.tokenizer = load_checkpoint(spec)
        self.device = next(self.model.parameters()).device
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.max_context = _max_context(self.model, self.tokenizer)
        self.eos_ids = frozenset(_eos_ids(self.model, self.tokenizer))
        self.gate: GateHead | None = None
        self._lm_head_input: torch.Tensor | None = None
        gate_file = _find_gate(spec)
        if gate_file is not None:
            hidden = self.model.config.get_text_config().hidden_size
            self.gate = load_gate(gate_file, hidden).to(self.device)
            head = self.model.get_output_embeddings()
            if head is None:
                raise InvalidRequest(f"model {spec.name!r} has no output head to attach a gate to")
            head.register_forward_pre_hook(self._remember_head_input)
        self._info = ModelInfo(
            name=spec.name,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            eos_token_ids=tuple(sorted(self.eos_ids)),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
            has_gate=self.gate is not None,
            device=str(self.device),
            dtype=spec.dtype,
        )

        # Owned by the worker thread from here on.
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[str, str] = OrderedDict()  # session id -> why it is gone
        self._decode_batch: _DecodeBatch | None = None
        self._last_step_decoded = False
        self._generate_seq = 0
        self._tokens_held = 0
        self._tokens_generated = 0
        self._forward_passes = 0
        self._forward_tokens = 0

        # Prompts of prompt_next_token_logprobs kept for reuse: session id -> its token ids.
        # Used by the calling event loop only (like every public method), never the worker.
        self._prompt_cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()

        self._inbox: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._stopping = False
        self._crash: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name=f"engine-{spec.name}", daemon=True)
        self._worker.start()

    # -- public async API (SessionModel) ----------------------------------------------------

    async def info(self) -> ModelInfo:
        return self._info

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        if not isinstance(prompt, str):
            prompt = as_token_ids(prompt, self.vocab_size, "prompt")
        return await self._submit(_Open(prompt))

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        ids = as_token_ids(token_ids, self.vocab_size, "token_ids")
        return await self._submit(_Append(session_id, ids))

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"params must be SamplingParams, got {type(params).__name__}")
        prefix = as_token_ids(prefix_ids, self.vocab_size, "prefix_ids")
        if session_id is None and not prefix:
            raise InvalidRequest("generate without a session needs prefix_ids: its prompt")
        return await self._submit(_Generate(session_id, params, prefix))

    async def score(self, session_id: str, token_ids: list[int]) -> list[float]:
        ids = as_token_ids(token_ids, self.vocab_size, "token_ids")
        return await self._submit(_Score(session_id, ids))

    async def next_token_logprobs(self, session_id: str, candidate_ids: list[int]) -> list[float]:
        """log p(c | session) for each candidate id c; the session is unchanged."""
        ids = as_token_ids(candidate_ids, self.vocab_size, "candidate_ids")
        return await self._submit(_Score(session_id, [], candidate_ids=ids))

    async def prompt_next_token_logprobs(
        self, prompt: list[int] | str, candidate_ids: list[int]
    ) -> list[float]:
        """log p(c | prompt) for each candidate id c, in one call (the learned switcher's one
        call per turn). The sessions of the last PROMPT_CACHE_SIZE token-id prompts are kept:
        a prompt sharing a prefix with one (the switcher's trace grows by a segment a turn)
        forks it at the shared prefix and feeds only the rest, in the pass that reads."""
        ids = as_token_ids(candidate_ids, self.vocab_size, "candidate_ids")
        if isinstance(prompt, str):
            session = await self.open(prompt)
            try:
                return await self._submit(_Score(session.session_id, [], candidate_ids=ids))
            finally:
                await self.close(session.session_id)
        prompt = tuple(as_token_ids(prompt, self.vocab_size, "prompt"))
        session_id, shared = await self._fork_cached_prompt(prompt)
        if session_id is not None:
            try:
                rest = list(prompt[shared:])
                logprobs = await self._submit(_Score(session_id, rest, candidate_ids=ids))
            except SessionLost:  # evicted in between (the engine was full): afresh below
                session_id = None
            except BaseException:
                await self.close(session_id)
                raise
        if session_id is None:
            # One token opens the session; the read feeds the rest: one forward pass.
            session_id = (await self.open(list(prompt[:1]))).session_id
            try:
                logprobs = await self._submit(
                    _Score(session_id, list(prompt[1:]), candidate_ids=ids)
                )
            except BaseException:
                await self.close(session_id)
                raise
        self._prompt_cache[session_id] = prompt
        while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
            oldest, _ = self._prompt_cache.popitem(last=False)
            await self.close(oldest)
        return logprobs

    async def _fork_cached_prompt(self, prompt: tuple[int, ...]) -> tuple[str | None, int]:
        """(a new session holding the longest prefix `prompt` shares with a cached prompt, its
        length); (None, 0) if no cached prompt shares PROMPT_CACHE_MIN_SHARED tokens."""
        best, shared = None, 0
        for session_id, cached in self._prompt_cache.items():
            n = len(os.path.commonprefix([cached, prompt]))
            if n > shared:
                best, shared = session_id, n
        if best is None or shared < PROMPT_CACHE_MIN_SHARED:
            return None, 0
        self._prompt_cache.move_to_end(best)
        try:
            (child,) = await self._submit(_Fork(best, 1, length=shared))
        except SessionLost:  # evicted by the engine's own bounds
            self._prompt_cache.pop(best, None)
            return None, 0
        return child, shared

    async def fork(self, session_id: str, n: int) -> list[str]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"fork n must be an integer >= 1, got {n!r}")
        return await self._submit(_Fork(session_id, n))

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InvalidRequest(f"truncate length must be an integer >= 1, got {length!r}")
        return await self._submit(_Truncate(session_id, length))

    async def close(self, session_id: str) -> None:
        await self._submit(_Close(session_id))

    def stats(self) -> EngineStats:
        return EngineStats(
            live_sessions=len(self._sessions),
            cached_tokens=self._tokens_held,
            tokens_generated=self._tokens_generated,
            forward_passes=self._forward_passes,
            forward_tokens=self._forward_tokens,
        )

    def check_health(self) -> None:
        """Raise if the engine cannot serve: its worker died or it was shut down."""
        if self._crash is not None:
            raise RuntimeError(f"engine {self.spec.name!r} worker died: {self._crash!r}")
        if self._stopping or not self._worker.is_alive():
            raise RuntimeError(f"engine {self.spec.name!r} is shut down")

    async def shutdown(self) -> None:
        """Stop the worker; requests still waiting fail with Overloaded."""
        self._stopping = True
        self._inbox.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._worker.join)

    async def _submit(self, op: _Op) -> Any:
        self.check_health()
        loop = asyncio.get_running_loop()
        call = _Call(op, loop, loop.create_future())
        self._inbox.put(call)
        return await call.future

    # -- worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping:
                    self._admit(block=not self._has_work())
                    self._expire_idle()
                    if not self._stopping and self._has_work():
                        self._step()
        except BaseException as e:  # a bug: fail everyone loudly, check_health reports it
            self._crash = e
        finally:
            self._fail_everything(Overloaded(f"engine {self.spec.name!r} stopped"))

    def _fail_everything(self, error: AntiphonError) -> None:
        for session in self._sessions.values():
            for call in session.calls:
                call.resolve(error=error)
            session.calls.clear()
        while True:
            try:
                call = self._inbox.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call.resolve(error=error)

    def _has_work(self) -> bool:
        return any(s.calls for s in self._sessions.values())

    def _admit(self, block: bool) -> None:
        """Take new requests off the inbox: validate them and queue them on their session."""
        try:
            call = self._inbox.get(timeout=IDLE_WAKE_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while call is not None:
            self._expire_idle()
            try:
                self._accept(call)
            except Exception as e:  # typed errors, or a tokenizer choking on odd text
                call.resolve(error=e)
            try:
                call = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, call: _Call) -> None:
        op = call.op
        if isinstance(op, _Open) or (isinstance(op, _Generate) and op.session_id is None):
            if isinstance(op, _Open):
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
            if isinstance(op, _Generate) and len(ids) == self.max_context:
                # refused before the session exists: its id would never reach the caller
                raise PromptTooLong(
                    f"prompt has {len(ids)} tokens, the whole context of model "
                    f"{self.spec.name!r}: no room to generate"
                )
            self._make_room(new_tokens=len(ids), new_sessions=1)
            session = self._new_session(list(ids), kv=[], n_cached=0)
            if isinstance(op, _Generate):
                op.session_id = session.session_id
                self._generate_seq += 1
                op.seq = self._generate_seq
            session.calls.append(call)
            return
        if isinstance(op, _Close) and op.session_id not in self._sessions:
            call.resolve(None)  # closing an unknown session is not an error
            return
        session = self._lookup(op.session_id)
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session.session_id)
        if isinstance(op, _Generate):
            self._generate_seq += 1
            op.seq = self._generate_seq
        session.calls.append(call)

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return as_token_ids(list(ids), self.vocab_size, "prompt")

    # -- session table --------------------------------------------------------------------

    def _new_session(self, token_ids: list[int], kv: kvcache.SessionKV, n_cached: int) -> _Session:
        session_id = f"{self.id_prefix}{uuid.uuid4().hex}"
        session = _Session(session_id, token_ids, kv, n_cached, time.monotonic())
        self._sessions[session_id] = session
        self._tokens_held += len(token_ids)
        return session

    def _lookup(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        why = self._gone.get(session_id)
        if why is None:
            raise SessionLost(f"unknown session {session_id!r} on model {self.spec.name!r}")
        raise SessionLost(f"session {session_id!r} on model {self.spec.name!r} is gone: {why}")

    def _forget(self, session: _Session, why: str) -> None:
        if self._sessions.pop(session.session_id, None) is None:
            return
        self._tokens_held -= len(session.token_ids)
        self._gone[session.session_id] = why
        while len(self._gone) > FORGOTTEN_IDS_KEPT:
            self._gone.popitem(last=False)
        lost = SessionLost(f"session {session.session_id!r} is gone: {why}")
        for call in session.calls:
            call.resolve(error=lost)
        session.calls.clear()
        session.kv = []

    def _expire_idle(self) -> None:
        deadline = time.monotonic() - self.spec.session_idle_timeout_s
        expired = [s for s in self._sessions.values() if not s.calls and s.last_used < deadline]
        for session in expired:
            self._forget(session, f"expired after {self.spec.session_idle_timeout_s:g}s idle")

    def _make_room(self, new_tokens: int, new_sessions: int, strict: bool = True) -> None:
        """Evict least recently used idle sessions until the new ones fit the caps."""

        def over() -> bool:
            return (
                len(self._sessions) + new_sessions > self.spec.max_sessions
                or self._tokens_held + new_tokens > self.spec.max_cached_tokens
            )

        if not over():
            return
        if new_tokens > self.spec.max_cached_tokens:
            raise PromptTooLong(
                f"{new_tokens} new tokens exceed model {self.spec.name!r}'s whole cache budget "
                f"(max_cached_tokens={self.spec.max_cached_tokens})"
            )
        for session in [s for s in self._sessions.values() if not s.calls]:
            self._forget(session, "evicted (least recently used, engine at capacity)")
            if not over():
                return
        if strict:
            raise Overloaded(
                f"model {self.spec.name!r} is full ({len(self._sessions)} sessions, "
                f"{self._tokens_held} tokens, all busy): retry later"
            )

    def _grow(self, session: _Session, token_ids: list[int]) -> None:
        session.token_ids.extend(token_ids)
        self._tokens_held += len(token_ids)

    def _shrink(self, session: _Session, length: int) -> None:
        self._tokens_held -= len(session.token_ids) - length
        del session.token_ids[length:]

    def _info_of(self, session: _Session) -> SessionInfo:
        return SessionInfo(session.session_id, len(session.token_ids))

    # -- one step ---------------------------------------------------------------------------

    def _step(self) -> None:
        """Run every immediate operation, then one forward pass over ready sessions."""
        decode_rows: list[_Row] = []
        prefill_rows: list[_Row] = []
        for session in list(self._sessions.values()):
            row = self._next_row(session)
            if row is None:
                continue
            is_decode = isinstance(row.call.op, _Generate) and len(row.tokens) == 1
            (decode_rows if is_decode else prefill_rows).append(row)
        if not decode_rows and not prefill_rows:
            return
        run_decode = bool(decode_rows) and not (prefill_rows and self._last_step_decoded)
        self._last_step_decoded = run_decode
        rows = self._pick_decode(decode_rows) if run_decode else self._fit_prefill(prefill_rows)
        try:
            if run_decode:
                self._decode_step(rows)
            else:
                self._prefill_step(rows)
        except Exception as e:  # a forward pass failed (e.g. out of memory): drop its sessions
            self._drop_decode_batch(keep_caches=False)
            for row in rows:
                if row.session.calls and row.session.calls[0] is row.call:
                    row.session.calls.popleft()
                    row.call.resolve(error=e)
                self._forget(row.session, f"lost in a failed forward pass ({e!r})")

    def _next_row(self, session: _Session) -> _Row | None:
        """Finish the session's operations that need no model; return its next forward row."""
        while session.calls:
            call = session.calls[0]
            try:
                row = self._row_or_result(session, call)
            except Exception as e:  # typed errors of bad requests; the session is unharmed
                session.calls.popleft()
                call.resolve(error=e)
                continue
            if row is not None:
                return row
            if session.session_id not in self._sessions:
                return None  # closed
        return None

    def _row_or_result(self, session: _Session, call: _Call) -> _Row | None:
        """The forward row the head call needs, or None after completing it right here."""
        op = call.op
        if isinstance(op, _Generate):
            if not op.started:
                self._start_generate(session, op)  # may append the prefix: pending after it
            pending = session.token_ids[session.n_cached :]
            return _Row(session, call, pending, len(pending), [len(pending) - 1])
        pending = session.token_ids[session.n_cached :]
        if isinstance(op, _Open | _Append):
            if isinstance(op, _Append) and op.token_ids:
                self._append_unfed(session, op.token_ids)
                op.token_ids = []  # appended; what remains is feeding them
            to_feed = session.token_ids[session.n_cached : -1]
            if to_feed:
                return _Row(session, call, to_feed, len(to_feed), [])
            self._complete(session, call, self._info_of(session))
            return None
        if isinstance(op, _Score) and op.candidate_ids is not None:
            if op.token_ids:
                self._append_unfed(session, op.token_ids)
                op.token_ids = []  # appended; fed with the read below
                pending = session.token_ids[session.n_cached :]
            last = len(pending) - 1  # its logits are the next-token distribution
            return _Row(session, call, pending, len(pending) - 1, [last])
        if isinstance(op, _Score):
            if not op.token_ids:
                self._complete(session, call, [])
                return None
            if len(session.token_ids) + len(op.token_ids) > self.max_context:
                raise PromptTooLong(
                    f"scoring {len(op.token_ids)} tokens after session {session.session_id!r} "
                    f"({len(session.token_ids)} tokens) exceeds the context of {self.max_context}"
                )
            first = len(pending) - 1
            positions = list(range(first, first + len(op.token_ids)))
            return _Row(session, call, pending + op.token_ids, len(pending) - 1, positions)
        if isinstance(op, _Fork):
            length = len(session.token_ids) if op.length is None else op.length
            if not 1 <= length <= len(session.token_ids):
                raise InvalidRequest(
                    f"cannot fork session {session.session_id!r} at {length} tokens: it has "
                    f"{len(session.token_ids)}"
                )
            n_cached = min(session.n_cached, length - 1)  # the last token stays pending
            kv = kvcache.crop(session.kv, n_cached)
            self._make_room(length * op.n, op.n)
            children = [
                self._new_session(list(session.token_ids[:length]), kv, n_cached)
                for _ in range(op.n)
            ]
            self._complete(session, call, [c.session_id for c in children])
            return None
        if isinstance(op, _Truncate):
            if op.length > len(session.token_ids):
                raise InvalidRequest(
                    f"cannot truncate session {session.session_id!r} to {op.length} tokens: it "
                    f"has {len(session.token_ids)}"
                )
            self._shrink(session, op.length)
            session.n_cached = min(session.n_cached, op.length - 1)
            session.kv = kvcache.crop(session.kv, session.n_cached)
            self._complete(session, call, self._info_of(session))
            return None
        if isinstance(op, _Close):
            session.calls.popleft()
            # Forget first: a caller that sees close return must see the session gone.
            self._forget(session, "closed")
            call.resolve(None)
            return None
        raise TypeError(f"unknown operation {op!r}")

    def _append_unfed(self, session: _Session, token_ids: list[int]) -> None:
        """Add tokens to a session, not yet fed (the caller's row feeds them)."""
        if len(session.token_ids) + len(token_ids) > self.max_context:
            raise PromptTooLong(
                f"appending {len(token_ids)} tokens to session {session.session_id!r} "
                f"({len(session.token_ids)} tokens) exceeds the context of {self.max_context}"
            )
        self._grow(session, token_ids)
        self._make_room(0, 0, strict=False)

    def _complete(self, session: _Session, call: _Call, result: Any) -> None:
        session.calls.popleft()
        session.last_used = time.monotonic()
        call.resolve(result)

    def _start_generate(self, session: _Session, op: _Generate) -> None:
        """Check room, append the prefix (fed with the pending token in the first pass)."""
        length = len(session.token_ids) + len(op.prefix_ids)
        if length >= self.max_context:  # checked before appending: a refused call changes nothing
            with_prefix = f" + {len(op.prefix_ids)} prefix tokens" if op.prefix_ids else ""
            raise PromptTooLong(
                f"session {session.session_id!r} holds {len(session.token_ids)} tokens"
                f"{with_prefix}, the whole context ({self.max_context}) of model "
                f"{self.spec.name!r}: no room to generate"
            )
        if op.prefix_ids:
            self._append_unfed(session, op.prefix_ids)
            op.prefix_ids = []
        op.generator = new_generator(op.params.seed)
        op.started = True

    # -- forward passes -------------------------------------------------------------------

    def _forward(
        self,
        rows: list[_Row],
        cache: Any,
        past_lengths: list[int],
        mask: torch.Tensor | None,
        logits_to_keep: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One model call. Inputs are right-padded to the longest row; returns logits and the
        LM head's input (for the gate) at the kept positions."""
        width = max(len(r.tokens) for r in rows)
        pad_id = 0
        input_ids = [r.tokens + [pad_id] * (width - len(r.tokens)) for r in rows]
        last_position = self.max_context - 1
        positions = [
            [min(n + j, last_position) for j in range(width)] for n in past_lengths
        ]  # pads get harmless positions past their row's end
        self._lm_head_input = None
        out = self.model(
            input_ids=torch.tensor(input_ids, device=self.device),
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self._forward_passes += 1
        self._forward_tokens += sum(len(r.tokens) for r in rows)
        for r in rows:
            r.call.computed += len(r.tokens)
        hidden = self._lm_head_input
        self._lm_head_input = None
        return out.logits, hidden

    def _remember_head_input(self, module: torch.nn.Module, args: tuple) -> None:
        self._lm_head_input = args[0]

    def _prefill_step(self, rows: list[_Row]) -> None:
        if any(self._in_decode_batch(r.session) for r in rows):
            self._drop_decode_batch(keep_caches=True)
        past_lengths = [r.session.n_cached for r in rows]
        cache, pads = kvcache.pack([r.session.kv for r in rows], past_lengths)
        width = max(len(r.tokens) for r in rows)
        longest_past = max(past_lengths)
        mask = None
        if any(pads) or any(len(r.tokens) != width for r in rows):
            mask = torch.zeros(len(rows), longest_past + width, dtype=torch.long)
            for i, r in enumerate(rows):
                mask[i, pads[i] : longest_past + len(r.tokens)] = 1
            mask = mask.to(self.device)
        want = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            want[i, r.logit_positions] = True
        n_wanted = int(want.sum())
        logits, hidden = self._forward(
            rows, cache, past_lengths, mask, want.to(self.device) if n_wanted else 1
        )
        layers = kvcache.layers_of(cache)
        offset = 0  # rows' wanted positions come flattened, row after row
        for i, r in enumerate(rows):
            session = r.session
            session.kv = kvcache.unpack_row(layers, i, pads[i], longest_past + r.keep)
            session.n_cached += r.keep
            k = len(r.logit_positions)
            row_logits = logits[offset : offset + k] if n_wanted else None
            row_hidden = hidden[offset : offset + k] if (n_wanted and hidden is not None) else None
            offset += k
            op = r.call.op
            if isinstance(op, _Score) and op.candidate_ids is not None:
                logprobs = torch.log_softmax(row_logits[-1].float(), dim=-1)  # (V,)
                self._complete(session, r.call, logprobs[op.candidate_ids].tolist())
            elif isinstance(op, _Score):
                logprobs = torch.log_softmax(row_logits.float(), dim=-1)
                targets = torch.tensor(op.token_ids, device=logprobs.device)
                scores = logprobs.gather(1, targets[:, None])[:, 0].tolist()
                self._complete(session, r.call, scores)
            elif isinstance(op, _Generate):
                self._after_logits([r], row_logits, row_hidden)
            # open/append: nothing to read; the call completes when its head sees nothing left

    def _fit_prefill(self, rows: list[_Row]) -> list[_Row]:
        """The first rows whose padded size fits the prefill budget (at least one)."""
        chosen: list[_Row] = []
        width = 0
        for row in rows[: self.spec.max_batch_size]:
            new_width = max(width, len(row.tokens))
            if chosen and new_width * (len(chosen) + 1) > PREFILL_TOKEN_BUDGET:
                break
            chosen.append(row)
            width = new_width
        return chosen

    def _in_decode_batch(self, session: _Session) -> bool:
        batch = self._decode_batch
        return batch is not None and any(s is session for s in batch.sessions)

    def _drop_decode_batch(self, keep_caches: bool) -> None:
        """Give every session of the decode batch its own cache back and forget the batch."""
        batch = self._decode_batch
        self._decode_batch = None
        if batch is None or not keep_caches:
            return
        layers = kvcache.layers_of(batch.cache)
        for i, session in enumerate(batch.sessions):
            start = batch.pads[i]
            session.kv = kvcache.unpack_row(layers, i, start, start + session.n_cached)

    def _pick_decode(self, rows: list[_Row]) -> list[_Row]:
        """Decode rows for this step: the current batch's members first, then the oldest calls."""
        rows = sorted(rows, key=lambda r: r.call.op.seq)
        batch = self._decode_batch
        if batch is not None:  # members keep their slots; newcomers fill the rest
            order = {id(s): i for i, s in enumerate(batch.sessions)}
            members = sorted(
                (r for r in rows if id(r.session) in order), key=lambda r: order[id(r.session)]
            )
            rows = members + [r for r in rows if id(r.session) not in order]
        return rows[: self.spec.max_batch_size]

    def _decode_step(self, rows: list[_Row]) -> None:
        batch = self._decode_batch
        same = batch is not None and [r.session for r in rows] == batch.sessions
        if not same:
            self._drop_decode_batch(keep_caches=True)
            lengths = [r.session.n_cached for r in rows]
            cache, pads = kvcache.pack([r.session.kv for r in rows], lengths)
            mask = None
            if any(pads):
                longest = max(lengths)
                mask = torch.ones(len(rows), longest, dtype=torch.long)
                for i, p in enumerate(pads):
                    mask[i, :p] = 0
                mask = mask.to(self.device)
            batch = _DecodeBatch([r.session for r in rows], cache, pads, mask)
            self._decode_batch = batch
            for session in batch.sessions:
                session.kv = []  # the batch holds it now
        if batch.mask is not None:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        logits, hidden = self._forward(
            rows, batch.cache, [r.session.n_cached for r in rows], batch.mask, 1
        )
        for r in rows:
            r.session.n_cached += 1
        finished = self._after_logits(
            rows, logits[:, -1], None if hidden is None else hidden[:, -1]
        )
        if finished:
            self._drop_decode_batch(keep_caches=True)

    # -- generate bookkeeping ---------------------------------------------------------------

    def _after_logits(
        self, rows: list[_Row], logits: torch.Tensor, hidden: torch.Tensor | None
    ) -> bool:
        """Gate, choose and record one token for each generate row; True if any call ended."""
        ops: list[_Generate] = [r.call.op for r in rows]
        gates = (
            self.gate(hidden).tolist() if (self.gate is not None and hidden is not None) else None
        )
        tokens, logprobs, logprob_matrix = choose_tokens(
            logits, [op.params for op in ops], [op.generator for op in ops]
        )
        any_finished = False
        for i, (r, op) in enumerate(zip(rows, ops, strict=True)):
            params = op.params
            finish: FinishReason | None = None
            cut: int | None = None
            if gates is not None:
                op.gates.append(gates[i])
                if params.gate_threshold is not None and gates[i] >= params.gate_threshold:
                    finish = "gate"
                    # no token follows the one just fed: it goes back to pending, as the
                    # session's last token always is (its cache position is dropped)
                    r.session.n_cached -= 1
                    if not self._in_decode_batch(r.session):
                        r.session.kv = kvcache.crop(r.session.kv, r.session.n_cached)
            if finish is None:
                token = tokens[i]
                op.token_ids.append(token)
                op.logprobs.append(logprobs[i])
                if params.logprobs_top_k:
                    op.top_logprobs.append(
                        top_alternatives(logprob_matrix[i], params.logprobs_top_k)
                    )
                self._grow(r.session, [token])
                self._tokens_generated += 1
                if token in params.stop_token_ids:
                    finish = "stop"
                elif token in self.eos_ids and not params.ignore_eos:
                    finish = "eos"
                elif params.stop_strings:
                    cut = find_stop_string(self._decode(op.token_ids), params.stop_strings)
                    if cut is not None:
                        finish = "stop"
                if finish is None and (
                    len(op.token_ids) >= params.max_new_tokens
                    or len(r.session.token_ids) >= self.max_context
                ):
                    finish = "length"
            if finish is not None:
                any_finished = True
                text = self._decode(op.token_ids)
                if cut is not None:
                    text = text[:cut]
                result = Generation(
                    session_id=r.session.session_id,
                    token_ids=tuple(op.token_ids),
                    text=text,
                    logprobs=tuple(op.logprobs),
                    top_logprobs=tuple(op.top_logprobs),
                    gates=tuple(op.gates),
                    finish_reason=finish,
                    length=len(r.session.token_ids),
                    new_tokens_computed=r.call.computed,
                )
                self._complete(r.session, r.call, result)
        if self._tokens_held > self.spec.max_cached_tokens:
            self._make_room(0, 0, strict=False)
        return any_finished

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
