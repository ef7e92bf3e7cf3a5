"""Executors: one per kind of decision, each in its own module. A new kind of decision is its
definition (`antiphon.policies.base`), its executor, and its line in `EXECUTORS`.

    executor = make_executor(decision, ctx)     # per request; the loop keeps it for reuse
    outcome = await executor.run(decision, state)
"""

from __future__ import annotations

from collections.abc import Callable

from antiphon.coordinator.executors.base import ExecutionContext, Executor
from antiphon.coordinator.executors.defer import DeferExecutor
from antiphon.coordinator.executors.search import SearchExecutor
from antiphon.coordinator.executors.write import FinishExecutor, WriteExecutor
from antiphon.policies.base import Decision, Finish, SearchStep, WriteSegment, WriteUntilDeferral

EXECUTORS: dict[type, Callable[[ExecutionContext], Executor]] = {
    WriteSegment: WriteExecutor,
    WriteUntilDeferral: DeferExecutor,
    SearchStep: SearchExecutor,
    Finish: FinishExecutor,
}


def make_executor(decision: Decision, ctx: ExecutionContext) -> Executor:
    """A new executor for this kind of decision; TypeError for a kind nothing runs."""
    try:
        return EXECUTORS[type(decision)](ctx)
    except KeyError:
        raise TypeError(f"no executor runs decisions of type {type(decision).__name__}") from None


__all__ = ["EXECUTORS", "ExecutionContext", "Executor", "make_executor"]
