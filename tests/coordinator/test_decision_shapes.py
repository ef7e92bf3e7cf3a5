"""Each of the three decision shapes runs through the coordinator with a trivial rule:
write-segment (the switcher's shape, see test_loop.py), write-until-deferral (Co-LLM) and
search-step (weak-to-strong chunk-level beam search)."""

from __future__ import annotations

import asyncio

from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.messages import SamplingParams
from antiphon.policies.base import Decision, SearchStep, WriteSegment
from antiphon.sequence import SequenceView
from tests.coordinator.conftest import live_sessions
from tests.coordinator.test_loop import PROMPT, ClosingBehindTheBack


def gate_threshold_that_fires_sometimes(engines, tokenizers) -> float:
    """A threshold that the hand-set gate of a_gated crosses on about one token in four."""

    async def probe():
        e = engines["a_gated"]
        s = await e.open(list(tokenizers["a_gated"](PROMPT)["input_ids"]))
        g = await e.generate(s.session_id, SamplingParams(max_new_tokens=40, ignore_eos=True))
        await e.close(s.session_id)
        return g.gates

    gates = sorted(asyncio.run(probe()))
    return gates[int(len(gates) * 0.75)]


def defer_by_hand(engines, tokenizers, threshold, seg_len, max_tokens):
    """Co-LLM inference by hand with the engines alone: the reference for the coordinator."""

    async def run():
        base, helper = engines["a_gated"], engines["b"]
        ids = list(tokenizers["b"](PROMPT)["input_ids"])
        sb, sh = (await base.open(ids)).session_id, (await helper.open(ids)).session_id
        out, left = [], max_tokens
        while left > 0:
            g = await base.generate(
                sb, SamplingParams(max_new_tokens=min(seg_len, left), gate_threshold=threshold)
            )
            if g.token_ids:
                out.append(("a_gated", g.token_ids, g.finish_reason))
                left -= len(g.token_ids)
                await helper.append(sh, list(g.token_ids))
            if g.finish_reason == "eos" or left == 0:
                break
            if g.finish_reason == "gate":
                h = await helper.generate(sh, SamplingParams(max_new_tokens=1))
                out.append(("b", h.token_ids, h.finish_reason))
                left -= len(h.token_ids)
                await base.append(sb, list(h.token_ids))
                if h.finish_reason == "eos":
                    break
        await base.close(sb)
        await helper.close(sh)
        return out

    return asyncio.run(run())


def test_write_until_deferral_hands_gated_tokens_to_the_assistant(engines, tokenizers):
    threshold = gate_threshold_that_fires_sometimes(engines, tokenizers)
    req = GenerationRequest(
        prompt=PROMPT,
        models=("a_gated", "b"),
        policy="defer",
        policy_params={"base": "a_gated", "assistant": "b", "eta": threshold},
        max_tokens=30,
    )
    result = asyncio.run(Coordinator(engines, tokenizers).generate(req))
    expected = defer_by_hand(engines, tokenizers, threshold, 64, 30)
    got = [(s.model, s.token_ids, s.model_finish) for s in result.segments]
    assert got == expected
    kinds = {s.model: s.kind for s in result.segments}
    assert kinds == {"a_gated": "write", "b": "deferred"}  # the gate fired at least once
    for seg in result.segments:
        if seg.model == "b":
            assert len(seg.token_ids) == 1
    assert live_sessions(engines) == 0


def search_request(untuned: str = "d", **kw) -> GenerationRequest:
    params = dict(proposer="a", tuned="b", untuned=untuned, width=2, successors=2, chunk_len=4)
    params.update(kw)
    return GenerationRequest(
        prompt=PROMPT,
        models=("a", "b", untuned),
        policy="w2s_search",
        policy_params=params,
        max_tokens=14,
        seed=5,
    )


def test_search_step_runs_beams_to_the_end(engines, tokenizers):
    coord = Coordinator(engines, tokenizers)
    result = asyncio.run(coord.generate(search_request()))
    assert result.segments and all(s.kind == "search" and s.model == "a" for s in result.segments)
    assert all(len(s.token_ids) <= 4 for s in result.segments)
    assert result.usage.completion_tokens <= 14  # the exact count: tests/coordinator/test_scripted
    again = asyncio.run(coord.generate(search_request()))
    assert again.text == result.text  # seeded: the same search
    assert live_sessions(engines) == 0


def test_search_with_a_guide_of_another_tokenizer(engines, tokenizers):
    result = asyncio.run(Coordinator(engines, tokenizers).generate(search_request(untuned="c")))
    assert result.segments and all(s.model == "a" for s in result.segments)
    assert live_sessions(engines) == 0


class SearchThenWrite:
    """Two search steps, then model b writes: a search settled by a different decision."""

    name = "search_then_write"
    version = "test"

    async def decide(self, view: SequenceView) -> Decision:
        if view.turn < 2:
            return SearchStep("a", "b", "d", width=2, successors=2, chunk_len=3)
        return WriteSegment("b", 4)


def test_search_settled_by_another_decision_keeps_the_best_beam(engines, tokenizers):
    coord = Coordinator(
        engines, tokenizers, resolve_policy=lambda name, params, ensemble: SearchThenWrite()
    )
    req = GenerationRequest(prompt=PROMPT, models=("a", "b", "d"), max_tokens=14, seed=1)
    result = asyncio.run(coord.generate(req))
    models = [s.model for s in result.segments]
    assert models[:2] == ["a", "a"] and set(models[2:]) <= {"b"}
    assert [s.kind for s in result.segments[:2]] == ["search", "search"]
    assert live_sessions(engines) == 0


def test_search_survives_a_lost_session(engines, tokenizers):
    losing = ClosingBehindTheBack(engines["a"], lose_on_generate=5)  # a child of step two
    coord = Coordinator({**engines, "a": losing}, tokenizers)
    result = asyncio.run(coord.generate(search_request()))
    assert losing.opens > 1  # beams rebuilt from the state
    assert result.segments and all(s.model == "a" for s in result.segments)
    assert live_sessions(engines) == 0
