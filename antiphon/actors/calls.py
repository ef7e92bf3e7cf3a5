"""The engine's operations as queued calls: what a caller asked for, and where its result goes.

Every public method of `ModelEngine` turns into one `Call` holding one operation. Calls of one
session wait in that session's queue and run in order; a call's operation is mutable while it
runs (a `Generate` collects its tokens, an `Append` forgets its tokens once they are in the
session), and nothing but the engine's worker thread touches it after submission.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from antiphon.actors.gate import GateHead
from antiphon.actors.logits import LogitsProcessor
from antiphon.messages import SamplingParams


@dataclass
class Open:
    prompt: list[int] | str  # token ids, or text the engine tokenizes (special tokens added)


@dataclass
class Append:
    session_id: str
    token_ids: list[int]  # emptied once they are in the session (what remains is feeding them)


@dataclass
class Generate:
    session_id: str | None  # None: open a new session whose prompt is prefix_ids
    params: SamplingParams
    prefix_ids: list[int] = field(default_factory=list)  # appended first; emptied once appended
    seq: int = 0  # arrival order; earlier generate calls get decode slots first
    generator: torch.Generator | None = None  # set when the call starts
    token_ids: list[int] = field(default_factory=list)  # written so far
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    gates: list[float] = field(default_factory=list)
    gate: GateHead | None = None  # the checkpoint's gate when the call started (kept to its end)
    # what its settings do to the logits (bias, penalties, a grammar); set when the call starts
    processors: list[LogitsProcessor] = field(default_factory=list)


@dataclass
class Score:
    session_id: str
    token_ids: list[int]
    # None: log p of each of token_ids after the session (nothing appended). Else: append
    # token_ids to the session, and return log p of each candidate as the next token after it
    # (one forward pass for both).
    candidate_ids: list[int] | None = None
    with_argmax: bool = False  # also the argmax at each scored position (teacher forcing)
    top_k: int = 0  # with_argmax: also the top_k most likely tokens at each scored position
    # append token_ids to the session as well (a search's guide reads a chunk's log-probs
    # and keeps it in one forward pass)
    keep: bool = False


@dataclass
class Fork:
    session_id: str
    n: int
    length: int | None = None  # the children hold the parent's first `length` tokens (None: all)


@dataclass
class Truncate:
    session_id: str
    length: int


@dataclass
class Close:
    session_id: str


Op = Open | Append | Generate | Score | Fork | Truncate | Close
IMMEDIATE = (Fork, Truncate, Close)  # never need the model: applied when they reach the head


@dataclass
class Call:
    """One awaited request: the operation and where to deliver its result."""

    op: Op
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    computed: int = 0  # positions fed for this call so far
    started: bool = False  # its one-time work at the head of the queue is done

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Hand the result (or error) to the caller's event loop; thread-safe."""

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
