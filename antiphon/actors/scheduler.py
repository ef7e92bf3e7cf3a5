"""The engine's scheduler: which sessions run in the next forward pass. Pure: it reads small
records of what each ready session needs and returns a plan; it changes nothing.

Two kinds of step, never mixed in one pass:
- decode: every session whose generate call is ready for its next token (one position to
  feed). Members of the decode batch kept from the last step go first, in their slots, so a
  steady batch is not repacked; newcomers follow in arrival order.
- prefill: open, append and score calls (and a generate with several pending tokens), in
  table order (least recently used first), as many as fit PREFILL_TOKEN_BUDGET padded
  positions (at least one).
When both kinds wait, steps alternate between them, so long prompts do not stall decoding.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

PREFILL_TOKEN_BUDGET = 8192  # most (padded) positions one prefill step feeds, past one row


@dataclass(frozen=True, slots=True)
class Candidate:
    """What one ready session needs from the next pass."""

    key: Hashable  # names the session for the caller
    decode: bool  # a generate call with exactly one position to feed
    tokens: int  # positions this row feeds
    seq: int  # arrival order of its call (decode slots go to the oldest first)
    batch_slot: int | None = None  # its row in the decode batch kept from the last step


@dataclass(frozen=True, slots=True)
class Plan:
    """One forward pass: its kind and its rows, in row order."""

    decode: bool
    keys: tuple[Hashable, ...]


def schedule(
    candidates: Sequence[Candidate],
    *,
    last_step_decoded: bool,
    max_batch: int,
    prefill_budget: int = PREFILL_TOKEN_BUDGET,
) -> Plan | None:
    """The next pass over `candidates` (given in table order), or None if there is none."""
    decode = [c for c in candidates if c.decode]
    prefill = [c for c in candidates if not c.decode]
    if not decode and not prefill:
        return None
    if decode and not (prefill and last_step_decoded):
        return Plan(True, tuple(c.key for c in _decode_rows(decode, max_batch)))
    return Plan(False, tuple(c.key for c in _prefill_rows(prefill, max_batch, prefill_budget)))


def _decode_rows(rows: list[Candidate], max_batch: int) -> list[Candidate]:
    """Members of the kept batch in their slots, then the oldest calls."""
    members = sorted((c for c in rows if c.batch_slot is not None), key=lambda c: c.batch_slot)
    newcomers = sorted((c for c in rows if c.batch_slot is None), key=lambda c: c.seq)
    return (members + newcomers)[:max_batch]


def _prefill_rows(rows: list[Candidate], max_batch: int, budget: int) -> list[Candidate]:
    """The first rows whose padded size (rows x longest) fits the budget; at least one."""
    chosen: list[Candidate] = []
    width = 0
    for row in rows[:max_batch]:
        new_width = max(width, row.tokens)
        if chosen and new_width * (len(chosen) + 1) > budget:
            break
        chosen.append(row)
        width = new_width
    return chosen
