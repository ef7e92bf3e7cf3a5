"""`replay_switch` through the coordinator over real engines: a replayed prefix reproduces
the run it was cut from, and completions under different seeds sample the rest apart (the
rollouts' k completions of one branch are k samples, not one text k times)."""

from __future__ import annotations

import asyncio

from antiphon.coordinator.request import GenerationRequest
from tests.coordinator.test_loop import PROMPT


def replay(coordinator, seed: int, prefix: list[int]) -> list[tuple[str, str]]:
    """(writer, text) per turn of one sampled replay_switch response of "b" alone (so the
    writers cannot tell completions apart: only their sampling can)."""
    req = GenerationRequest(
        prompt=PROMPT, models=("b",), policy="replay_switch",
        policy_params={"prefix_models": ["b"] * len(prefix), "prefix_tokens": prefix,
                       "segment_len": 4, "seed": seed},
        max_tokens=40, temperature=1.0, seed=7,
    )  # fmt: skip
    result = asyncio.run(coordinator.generate(req))
    return [(s.model, s.text) for s in result.segments]


def test_completions_under_other_seeds_sample_the_rest_apart(coordinator):
    full = replay(coordinator, seed=0, prefix=[4, 4, 4])
    completions = [replay(coordinator, seed=s, prefix=[4, 4]) for s in (1, 2, 3, 1)]
    # the prefix replays the first run, text for text, whatever seed completes it
    assert all(c[:2] == full[:2] for c in completions)
    # same seed, same completion; other seeds, other completions
    assert completions[0] == completions[3]
    assert len({tuple(c[2:]) for c in completions[:3]}) == 3
