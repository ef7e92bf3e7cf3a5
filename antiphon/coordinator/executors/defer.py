"""`WriteUntilDeferral` (Co-LLM): the base model writes until its gate fires (decided next to
the model, inside one generate call); then the assistant writes `assistant_tokens` tokens.
The assistant writes after the state the base's segment leads to (`apply`), so it does not
write when that segment already ended the response.
"""

from __future__ import annotations

from antiphon.coordinator.commit import Outcome, apply
from antiphon.coordinator.executors.base import ExecutionContext, Stateless
from antiphon.coordinator.executors.write import write_segment
from antiphon.policies.base import WriteUntilDeferral
from antiphon.sequence import SequenceState


class DeferExecutor(Stateless):
    """Runs `WriteUntilDeferral`."""

    def __init__(self, ctx: ExecutionContext) -> None:
        self.ctx = ctx

    async def run(self, decision: WriteUntilDeferral, state: SequenceState) -> Outcome:
        d = decision
        drafted = await write_segment(
            self.ctx, state, d.base, d.max_tokens, "write", gate=d.gate_threshold
        )
        after = apply(state, drafted, self.ctx.trim)
        gated = not drafted.segments or drafted.segments[-1].model_finish == "gate"
        if after.done or not gated:
            return drafted
        helped = await write_segment(self.ctx, after, d.assistant, d.assistant_tokens, "deferred")
        return drafted.then(helped)
