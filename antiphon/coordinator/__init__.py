"""The coordinator: per-request sequence state and the turn loop (decide, run, append).

    from antiphon.coordinator import GenerationRequest
    from antiphon.coordinator.loop import Coordinator
    result = await Coordinator(models, tokenizers).generate(GenerationRequest(...))

`antiphon.coordinator.deployment` serves the same loop as a Ray Serve deployment.
"""

from antiphon.coordinator.request import (
    FinishEvent,
    GenerationRequest,
    GenerationResult,
    SegmentEvent,
    StreamEvent,
    Usage,
    openai_finish_reason,
)
from antiphon.coordinator.state import (
    Beam,
    Segment,
    SequenceState,
    SequenceStatus,
    SequenceView,
)

__all__ = [
    "Beam",
    "FinishEvent",
    "GenerationRequest",
    "GenerationResult",
    "Segment",
    "SegmentEvent",
    "SequenceState",
    "SequenceStatus",
    "SequenceView",
    "StreamEvent",
    "Usage",
    "openai_finish_reason",
]
