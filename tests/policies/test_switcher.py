"""The switcher's pure part: prompt, tags, truncation, index tokens, selection; and the policy
over an in-process engine (forced first/last models, one model call per turn)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from antiphon.errors import InvalidRequest
from antiphon.policies import build_policy
from antiphon.policies.base import WriteSegment
from antiphon.policies.registry import check_request_params
from antiphon.policies.switcher import (
    Switch,
    SwitchParams,
    index_token_ids,
    normalise,
    select,
    switcher_prompt,
    switcher_prompt_ids,
    tag_segment,
    view_segments,
)
from antiphon.sequence import Segment, SequenceView
from tests.factories import make_view


def view(segments=(), models=("a", "b", "c"), max_tokens=64, turn=None) -> SequenceView:
    segs = tuple(Segment(m, tuple(range(len(t))), t, (), i) for i, (m, t) in enumerate(segments))
    return make_view(
        segs, models=models, prompt="Q: 2+2?\nA:", turn=turn, max_tokens=max_tokens, seed=1
    )


def test_prompt_tags_every_segment_with_its_writer_and_ends_with_the_question():
    v = view([("b", " 4"), ("a", " is it")])
    text = switcher_prompt(v.prompt, view_segments(v), 3)
    assert "Query: Q: 2+2?\nA:" in text
    assert tag_segment(1, " 4") + tag_segment(0, " is it") in text
    assert tag_segment(1, " 4") == "<model 1 begins> 4<model 1 ends>"
    assert text.endswith("Respond with a number from 0 to 2. The answer is model ")


def test_prompt_ids_keep_query_and_recent_trace_when_too_long(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    segs = [(0, "x" * 40), (1, "y" * 40)]
    full = switcher_prompt_ids(tok, "Q", segs, 2, 10_000)
    assert tok.decode(full, skip_special_tokens=True) == switcher_prompt("Q", segs, 2)
    cut = switcher_prompt_ids(tok, "Q", segs, 2, len(full) - 60)
    assert len(cut) == len(full) - 60
    text = tok.decode(cut, skip_special_tokens=True)
    assert "Query: Q" in text and text.endswith("The answer is model ")
    assert "y" * 40 in text and "x" * 40 not in text  # the oldest part went first
    with pytest.raises(InvalidRequest, match="context"):
        switcher_prompt_ids(tok, "Q" * 50, segs, 2, 20)


def test_index_tokens_are_the_digits(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = index_token_ids(tok, 3)
    assert [tok.decode([i]) for i in ids] == ["0", "1", "2"]
    with pytest.raises(InvalidRequest, match="2 to 10"):
        index_token_ids(tok, 1)


def test_selection_argmax_and_seeded_top_p():
    probs = normalise([-3.0, -0.1, -2.0])
    assert abs(sum(probs) - 1) < 1e-9
    assert select(probs, "argmax", 1.0, random.Random(0)) == 1
    assert select([0.5, 0.5], "argmax", 1.0, random.Random(0)) == 0  # first of equals
    # top_p small enough keeps only the most likely
    assert {select(probs, "top_p", 0.5, random.Random(s)) for s in range(20)} == {1}
    draws = [select([0.4, 0.35, 0.25], "top_p", 0.7, random.Random(s)) for s in range(200)]
    assert set(draws) == {0, 1}  # the nucleus: 0.4 + 0.35 >= 0.7, the third never drawn
    again = [select([0.4, 0.35, 0.25], "top_p", 0.7, random.Random(s)) for s in range(200)]
    assert draws == again


def test_params_are_validated_against_the_ensemble():
    with pytest.raises(InvalidRequest, match="'zz'"):
        build_policy("switch", {"switcher_path": "x", "first_model": "zz"}, ("a", "b"))
    with pytest.raises(InvalidRequest, match="selection"):
        build_policy("switch", {"switcher_path": "x", "selection": "best"}, ("a", "b"))


class CountingScorer:
    """The engine, counting the switcher's calls per turn."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.calls = 0

    async def info(self):
        return await self.engine.info()

    async def prompt_next_token_logprobs(self, prompt, candidate_ids):
        self.calls += 1
        return await self.engine.prompt_next_token_logprobs(prompt, candidate_ids)


def test_policy_reads_the_switcher_once_per_turn_and_forces_first_and_last(tiny_model_dir):
    from antiphon.actors.engine import ModelEngine
    from antiphon.config import ModelSpec

    engine = ModelEngine(ModelSpec(name="sw", path=str(tiny_model_dir)))
    scorer = CountingScorer(engine)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    async def run():
        params = SwitchParams(
            switcher_path=str(tiny_model_dir), segment_len=8, first_model="c", last_model="a"
        )
        policy = Switch(params, model=scorer, tokenizer=tok)
        first = await policy.decide(view())
        mid_view = view([("c", "abcdefgh")])
        probs = await policy.distribution(mid_view)
        mid = await policy.decide(mid_view)
        last = await policy.decide(view([("c", "x" * 60)], max_tokens=64))
        await engine.shutdown()
        return first, probs, mid, last

    first, probs, mid, last = asyncio.run(run())
    assert first == WriteSegment("c", 8, speculate=True) and last == WriteSegment(
        "a", 8, speculate=True
    )
    assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-6
    assert mid == WriteSegment(
        ("a", "b", "c")[max(range(3), key=lambda i: probs[i])], 8, speculate=True
    )
    assert scorer.calls == 2  # distribution + one decide: the forced turns cost nothing


def test_policies_over_one_switcher_share_its_model_whatever_their_parameters(tmp_path):
    """Rollouts build a policy per request seed: each must not load the switcher again."""
    from tests.factories import make_tiny_model

    path = str(make_tiny_model(tmp_path / "switcher", seed=7))
    policies = [build_policy("switch", {"switcher_path": path, "seed": s}, ("a", "b"))
                for s in range(5)]  # fmt: skip
    assert len({id(p) for p in policies}) == 5  # one policy per parameters...
    assert len({id(p.model) for p in policies}) == 1  # ...one engine for the checkpoint
    assert len({id(p.tokenizer) for p in policies}) == 1
    assert {p.version for p in policies} == {policies[0].version} != {"unknown"}


def test_switchers_no_policy_holds_are_stopped_beyond_a_few(tmp_path):
    """An online trainer promotes (and judges) one switcher after another: the engines of
    the old ones are stopped once no policy holds them, the newest few kept."""
    import gc

    from antiphon.policies.switcher import MAX_UNUSED_SWITCHERS, SWITCHERS
    from tests.factories import make_tiny_model

    def policy(i: int) -> Switch:
        path = str(make_tiny_model(tmp_path / f"switcher-{i}", seed=20 + i))
        return build_policy("switch", {"switcher_path": path}, ("a", "b"))

    held = policy(0)  # a request in flight, say
    dropped = [policy(i).model for i in range(1, MAX_UNUSED_SWITCHERS + 3)]
    gc.collect()
    newest = policy(99)  # building a policy drops what nobody holds, beyond the newest few
    loaded = list(SWITCHERS.models.values())
    assert held.model in loaded and newest.model in loaded
    stopped = [m for m in dropped if m not in loaded]
    assert len(stopped) == 2 and stopped == dropped[:2]  # the oldest unused ones
    for engine in stopped:
        with pytest.raises(RuntimeError, match="shut down"):
            engine.check_health()
    held.model.check_health()  # the held one still serves
    assert asyncio.run(held.distribution(view(models=("a", "b"))))  # and answers


def test_stop_at_eos_off_lets_the_next_writer_go_on_after_an_end_token(trained_switcher):
    """Zoo models: aligned (forced first) answers ' No.' and its end token; the trained test
    switcher prefers model 1, base. stop_at_eos on: the answer ends there; off: the end token
    leaves the sequence and base goes on writing to the budget."""
    from antiphon.actors.engine import ModelEngine
    from antiphon.checkpoint import resolve_checkpoint_path
    from antiphon.config import ModelSpec
    from antiphon.coordinator.loop import Coordinator
    from antiphon.coordinator.request import GenerationRequest

    names = ("aligned", "base")
    engines = {n: ModelEngine(ModelSpec(name=n, path=f"zoo:{n}")) for n in names}
    toks = {n: AutoTokenizer.from_pretrained(resolve_checkpoint_path(f"zoo:{n}")) for n in names}
    coord = Coordinator(engines, toks)
    prompt = "Q: Answer yes or no: is Glones the capital of Ginque?\nA:"

    async def run(stop_at_eos: bool):
        params = {"switcher_path": str(trained_switcher[0]), "segment_len": 16,
                  "first_model": "aligned", "stop_at_eos": stop_at_eos}  # fmt: skip
        return await coord.generate(GenerationRequest(
            prompt=prompt, models=names, policy="switch", policy_params=params, max_tokens=40,
        ))  # fmt: skip

    async def both():
        try:
            return await run(True), await run(False)
        finally:
            for e in engines.values():
                await e.shutdown()

    stopped, went_on = asyncio.run(both())
    assert stopped.finish_reason == "eos" and [s.model for s in stopped.segments] == ["aligned"]
    first = stopped.segments[0]
    assert went_on.segments[0].text == first.text and went_on.text.startswith(first.text)
    assert went_on.segments[0].token_ids == first.token_ids[:-1]  # the end token left
    assert [s.model for s in went_on.segments[1:]] == ["base"] * (len(went_on.segments) - 1)
    assert went_on.finish_reason == "length" and len(went_on.segments) >= 2
    assert went_on.usage.completion_tokens == 40 == sum(len(s.token_ids) for s in went_on.segments)


def test_replay_completes_with_the_switcher_once_past_the_prefix(tmp_path):
    """On-policy completions: the replayed turns first, then the same writers the switch
    policy picks (same switcher, same seed), and the policy's version is the switcher's."""
    from tests.factories import make_tiny_model

    path = str(make_tiny_model(tmp_path / "switcher", seed=3))
    ensemble = ("a", "b", "c")
    switcher = {"switcher_path": path, "selection": "top_p", "segment_len": 4}
    replay = build_policy("replay_switch", {"prefix_models": ["c"], "prefix_tokens": [2],
                                            "segment_len": 4, "seed": 11,
                                            "completion_switcher": switcher}, ensemble)  # fmt: skip
    alone = build_policy("switch", {**switcher, "seed": 11}, ensemble)
    views = [view([("c", "ab")] + [("a", "wxyz")] * k) for k in range(6)]

    async def run():
        return [await replay.decide(view())] + [
            (await replay.decide(v), await alone.decide(v)) for v in views
        ]

    first, *pairs = asyncio.run(run())
    assert first == WriteSegment("c", 2)
    # the switcher's writers, sampled from the completion's own seed
    assert all(got == replace(expected, sample_seed=11) for got, expected in pairs)
    assert replay.version == alone.version != "unknown"
    with pytest.raises(InvalidRequest, match="completion_switcher"):  # it names a path
        check_request_params("replay_switch", {"completion_switcher": switcher}, own_policy=False)
