"""Baselines of Switch Generation: the trained router learns a query -> model rule from
outcomes and routes by it; logit fusion averages distributions (two copies of one model fuse
to that model's own greedy text)."""

from __future__ import annotations

import asyncio
import math

import pytest
from transformers import AutoTokenizer

from antiphon.actors.engine import ModelEngine
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest, SessionLost
from antiphon.messages import SamplingParams
from antiphon.policies import build_policy
from antiphon.policies.base import WriteSegment
from antiphon.policies.fusion import FusionGenerator, fuse
from antiphon.training.router_training import QueryOutcome, train_router
from tests.policies.test_switcher import view


def test_router_learns_which_model_each_kind_of_query_wants(tmp_path):
    outcomes = [QueryOutcome(f"q{i}", "t", f"Add {i} and {i + 3}", (0.0, 1.0)) for i in range(10)]
    outcomes += [QueryOutcome(f"c{i}", "t", f"The capital of Zor{i} is", (1.0, 0.0))
                 for i in range(10)]  # fmt: skip
    outcomes += [QueryOutcome("tie", "t", "anything", (1.0, 1.0))]
    report = train_router(outcomes, ("a", "b"), tmp_path)
    assert report["informative"] == 20 and report["train_accuracy"] == 1.0
    policy = build_policy(
        "trained_router", {"weights": str(tmp_path), "segment_len": 7}, ("a", "b")
    )

    async def route(prompt: str):
        v = view(models=("a", "b"))
        return await policy.decide(type(v)(**{**{f: getattr(v, f) for f in v.__slots__},
                                              "prompt": prompt}))  # fmt: skip

    assert asyncio.run(route("Add 40 and 2")) == WriteSegment("b", 7)
    assert asyncio.run(route("The capital of Quux is")) == WriteSegment("a", 7)
    with pytest.raises(InvalidRequest, match="not in the ensemble"):
        asyncio.run(policy.decide(view(models=("a", "c"))))


def test_fuse_averages_probabilities():
    out = fuse([[math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]])
    assert [round(math.exp(x), 6) for x in out.tolist()] == [0.7, 0.3]


def test_fusion_of_two_copies_is_the_model_itself(tiny_model_dir, other_tiny_model_dir):
    spec = ModelSpec(name="a", path=str(tiny_model_dir))
    one, two = ModelEngine(spec), ModelEngine(spec)
    other = ModelEngine(ModelSpec(name="b", path=str(other_tiny_model_dir)))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = SamplingParams(max_new_tokens=12)

    async def run():
        s = await one.open("Once upon")
        alone = (await one.generate(s.session_id, params)).text
        await one.close(s.session_id)
        same = await FusionGenerator({"a": one, "a2": two}, tok)("Once upon", params)
        mixed = await FusionGenerator({"a": one, "b": other}, tok)("Once upon", params)
        live = one.stats().live_sessions + two.stats().live_sessions
        for e in (one, two, other):
            await e.shutdown()
        return alone, same, mixed, live

    alone, same, mixed, live = asyncio.run(run())
    assert same == alone and len(mixed) > 0 and live == 0


def test_fusion_stops_when_the_context_is_full(tmp_path):
    """Fused decoding writes until the shortest context is full, then stops (no error)."""
    from tests.factories import make_tiny_model

    dirs = [make_tiny_model(tmp_path / n, seed=s, max_context=40) for s, n in enumerate("pq")]
    engines = {d.name: ModelEngine(ModelSpec(name=d.name, path=str(d))) for d in dirs}
    tok = AutoTokenizer.from_pretrained(dirs[0])
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)

    async def run():
        try:
            return await FusionGenerator(engines, tok)("Once upon", params)
        finally:
            for e in engines.values():
                await e.shutdown()

    text = asyncio.run(run())
    prompt_len = len(tok("Once upon")["input_ids"])
    # Decoding drops any special tokens the random models wrote, so count at most the room.
    assert 0 < len(tok(text, add_special_tokens=False)["input_ids"]) <= 40 - prompt_len


PROMPTS = ("Once upon", "The cat", "Zq", "A long time ago there")


def fusion_engines(tiny_model_dir, other_tiny_model_dir) -> dict[str, ModelEngine]:
    return {
        "a": ModelEngine(ModelSpec(name="a", path=str(tiny_model_dir))),
        "b": ModelEngine(ModelSpec(name="b", path=str(other_tiny_model_dir))),
    }


def test_concurrent_fused_requests_are_batched_and_each_writes_its_own_text(
    tiny_model_dir, other_tiny_model_dir
):
    """Requests in flight together step in lockstep: each engine reads all their sessions in
    one pass per token, and each request writes what it writes alone (its own seed, length
    and sampling)."""
    engines = fusion_engines(tiny_model_dir, other_tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = [SamplingParams(max_new_tokens=6 + 3 * i, temperature=0.8 * (i % 2), seed=i,
                             ignore_eos=True) for i in range(len(PROMPTS))]  # fmt: skip

    async def run():
        fused = FusionGenerator(engines, tok)
        try:
            passes = engines["a"].stats().forward_passes
            alone = [await fused(p, s) for p, s in zip(PROMPTS, params, strict=True)]
            alone_passes = engines["a"].stats().forward_passes - passes
            passes = engines["a"].stats().forward_passes
            together = await asyncio.gather(*map(fused, PROMPTS, params))
            together_passes = engines["a"].stats().forward_passes - passes
            live = sum(e.stats().live_sessions for e in engines.values())
        finally:
            for e in engines.values():
                await e.shutdown()
        return alone, together, alone_passes, together_passes, live

    alone, together, alone_passes, together_passes, live = asyncio.run(run())
    assert together == alone and len(set(alone)) == len(PROMPTS)
    # alone: about two passes per token of every request; together: of the longest one
    assert together_passes < alone_passes / 2
    assert live == 0


class LosesOneSession:
    """A real engine whose session opened on `prompt` is lost at its `after`-th read, as
    an eviction would lose it."""

    def __init__(self, engine: ModelEngine, prompt: str, after: int) -> None:
        self.engine, self.prompt, self.after = engine, prompt, after
        self.doomed: str | None = None

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    async def open(self, prompt):
        info = await self.engine.open(prompt)
        if prompt == self.prompt:
            self.doomed = info.session_id
        return info

    async def next_token_logprobs(self, session_id, candidate_ids):
        if session_id == self.doomed:
            self.after -= 1
            if self.after < 0:
                raise SessionLost(f"session {session_id!r} was evicted")
        return await self.engine.next_token_logprobs(session_id, candidate_ids)


def test_a_failed_or_cancelled_fused_request_leaves_the_others_running(
    tiny_model_dir, other_tiny_model_dir
):
    engines = fusion_engines(tiny_model_dir, other_tiny_model_dir)
    lossy = {"a": LosesOneSession(engines["a"], PROMPTS[1], after=3), "b": engines["b"]}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)

    async def run():
        try:
            alone = await FusionGenerator(engines, tok)(PROMPTS[0], params)
            fused = FusionGenerator(lossy, tok)
            calls = [asyncio.ensure_future(fused(p, params)) for p in PROMPTS[:3]]
            await asyncio.sleep(0.05)
            calls[2].cancel()  # its caller gave up
            got = await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(0.05)  # the cancelled call's sessions close as it unwinds
            live = sum(e.stats().live_sessions for e in engines.values())
        finally:
            for e in engines.values():
                await e.shutdown()
        return alone, got, live

    alone, (first, lost, cancelled), live = asyncio.run(run())
    assert first == alone  # written to the end, as alone
    assert isinstance(lost, SessionLost) and "evicted" in str(lost)
    assert isinstance(cancelled, asyncio.CancelledError)
    assert live == 0  # every session of the three closed
