"""The coordinator over scripted models (`tests.fakes.ScriptedModel`): every write, gate and
guide score is known in advance, so each executor's result is asserted exactly.

    pytest tests/coordinator/test_scripted.py -q
"""

from __future__ import annotations

import asyncio

from antiphon.coordinator.executors.base import derive_seed
from antiphon.coordinator.loop import Coordinator
from antiphon.policies.base import Decision, SearchStep, WriteSegment
from antiphon.sequence import SequenceView
from tests.factories import make_request
from tests.fakes import TOKENIZER, ScriptedModel

LETTERS = "abcdefgh"


def coordinator(*models: ScriptedModel, policy=None) -> Coordinator:
    resolve = None if policy is None else (lambda name, params, ensemble: policy)
    return Coordinator(
        {m.name: m for m in models},
        {m.name: TOKENIZER for m in models},
        resolve_policy=resolve,
    )


def generate(coord: Coordinator, **request):
    return asyncio.run(coord.generate(make_request(**request)))


class Script:
    """A policy that returns the given decisions in turn."""

    name = "script"
    version = "v1"

    def __init__(self, *decisions: Decision) -> None:
        self.decisions = decisions

    async def decide(self, view: SequenceView) -> Decision:
        return self.decisions[min(view.turn, len(self.decisions) - 1)]


# ----- writing -------------------------------------------------------------------------------


def test_the_budget_cuts_the_last_segment():
    text = "Once there was a long story to tell"
    a, b = ScriptedModel("a", text=text), ScriptedModel("b", text=text)
    result = generate(
        coordinator(a, b), policy="round_robin", policy_params={"segment_len": 5}, max_tokens=7
    )
    assert [(s.model, s.text) for s in result.segments] == [("a", "Once "), ("b", "th")]
    assert result.finish_reason == "length"


def test_a_full_context_ends_the_response_with_length():
    """Turns are capped to the room left in the writer's context; the response ends with
    "length" (not an error) once it is full."""
    text = "x" * 100
    p, q = (ScriptedModel(n, text=text, max_context=40) for n in "pq")
    result = generate(
        coordinator(p, q),
        models=("p", "q"),
        policy="round_robin",
        policy_params={"segment_len": 7},
        max_tokens=200,
    )
    prompt_len = len(TOKENIZER("Once upon a time, ")["input_ids"])
    assert result.finish_reason == "length"
    assert sum(len(s.token_ids) for s in result.segments) == 40 - prompt_len


def test_an_end_token_that_ends_only_its_segment_is_cut_off_the_session_not_reopened():
    a = ScriptedModel("a", text="ab|cd|")
    policy = Script(WriteSegment("a", 10, end_on_eos=False))
    result = generate(coordinator(a, ScriptedModel("b", text=""), policy=policy), max_tokens=20)
    assert [s.text for s in result.segments] == ["ab", "cd"]
    assert all(s.token_ids[-1] != TOKENIZER.eos_token_id for s in result.segments)
    assert result.finish_reason == "eos"  # the third write had nothing but its end token
    # one session all along: each dropped end token was truncated away, nothing re-prefilled
    assert a.calls["truncate"] == 3 and a.calls["open"] == 0 and a.calls["close"] == 1
    assert not a.sessions


# ----- deferral (Co-LLM) -----------------------------------------------------------------------


def test_the_assistant_writes_where_the_gate_fires_and_not_after_the_end():
    text = "one two three"
    gate = lambda so_far: 1.0 if so_far.endswith(" ") else 0.0  # noqa: E731
    base = ScriptedModel("base", text=text, gate=gate)
    helper = ScriptedModel("helper", text=text)
    result = generate(
        coordinator(base, helper),
        models=("base", "helper"),
        policy="defer",
        policy_params={"base": "base", "assistant": "helper", "eta": 0.5},
        max_tokens=40,
    )
    assert [(s.model, s.kind, s.text) for s in result.segments] == [
        ("base", "write", "one "),
        ("helper", "deferred", "t"),
        ("base", "write", "wo "),
        ("helper", "deferred", "t"),
        ("base", "write", "hree"),
    ]
    assert result.finish_reason == "eos"
    assert helper.calls["generate"] == 2  # not asked again once base ended the response


# ----- weak-to-strong search -------------------------------------------------------------------


def search_models(letter_score):
    """A proposer writing one letter per child (by its seed) and a guide pair whose log-ratio
    of a chunk is `letter_score(first letter)`."""
    proposer = ScriptedModel("p", chunk=lambda seed: LETTERS[seed % len(LETTERS)] * 4)
    tuned = ScriptedModel("t", score=lambda text: letter_score(text[0]))
    untuned = ScriptedModel("u", score=lambda text: 0.0)
    return proposer, tuned, untuned


def letter(seed: int, *parts: int) -> str:
    return LETTERS[derive_seed(seed, *parts) % len(LETTERS)]


def search(coord: Coordinator, width: int, successors: int, chunk_len: int, max_tokens: int):
    params = dict(proposer="p", tuned="t", untuned="u", width=width, successors=successors,
                  chunk_len=chunk_len)  # fmt: skip
    return generate(coord, models=("p", "t", "u"), policy="w2s_search",
                    policy_params=params, max_tokens=max_tokens, seed=11)  # fmt: skip


def test_best_of_n_keeps_the_child_the_guides_score_highest():
    score = {c: float(i) for i, c in enumerate(LETTERS)}.__getitem__  # later letters better
    result = search(coordinator(*search_models(score)), 1, 4, 3, max_tokens=3)
    children = [letter(11, 0, 0, k) for k in range(4)]
    assert len(set(children)) > 1  # the seeds give different chunks: the ranking decides
    assert result.text == max(children) * 3
    reversed_result = search(coordinator(*search_models(lambda c: -score(c))), 1, 4, 3, 3)
    assert reversed_result.text == min(children) * 3


def test_beam_search_keeps_the_best_width_and_commits_the_best_path():
    score = {"a": 0.0, "b": 5.0, "c": 1.0, "d": 4.0, "e": 2.0, "f": 3.0, "g": 6.0, "h": 0.5}
    result = search(coordinator(*search_models(score.__getitem__)), 2, 2, 2, max_tokens=4)
    # the reference: step 0 from the prompt (W*K children), keep the best W, expand each K ways
    first = [letter(11, 0, 0, k) for k in range(4)]
    kept = sorted(range(4), key=lambda i: (-score[first[i]], i))[:2]
    paths = [
        (score[first[i]] + score[letter(11, 1, rank, k)], first[i] + letter(11, 1, rank, k))
        for rank, i in enumerate(kept)
        for k in range(2)
    ]
    best = max(paths, key=lambda p: p[0])[1]  # the first of equals wins, as in the search
    assert result.text == "".join(c * 2 for c in best)
    assert all(s.kind == "search" and s.model == "p" for s in result.segments)


def test_a_search_settled_by_another_decision_commits_its_best_beam():
    score = {c: float(i) for i, c in enumerate(LETTERS)}.__getitem__
    writer = ScriptedModel("w", chunk=lambda seed: "zz")
    step = SearchStep("p", "t", "u", width=2, successors=2, chunk_len=2)
    policy = Script(step, step, WriteSegment("w", 2), WriteSegment("w", 2))
    models = (*search_models(score), writer)
    result = generate(coordinator(*models, policy=policy), models=("p", "t", "u", "w"),
                      max_tokens=8, seed=11)  # fmt: skip
    first = [letter(11, 0, 0, k) for k in range(4)]
    kept = sorted(range(4), key=lambda i: (-score(first[i]), i))[:2]
    paths = [first[i] + letter(11, 1, rank, k) for rank, i in enumerate(kept) for k in range(2)]
    best = max(paths, key=lambda p: score(p[0]) + score(p[1]))
    assert result.text == "".join(c * 2 for c in best) + "zzzz"
    assert [s.model for s in result.segments][-2:] == ["w", "w"]
    for m in models:  # every beam's session closed
        assert not m.sessions, m.name


def test_a_finished_beam_stays_a_candidate_and_wins_over_later_beams():
    """Children "b" end at once (an end token) and score 10; children "a" go on and score -1
    a chunk. The search keeps expanding the "a" beams until the budget ends them, and the
    finished "b" beam, kept all along, is what it commits."""
    proposer = ScriptedModel("p", chunk=lambda seed: "b<eos>" if seed % 5 == 0 else "aa")
    tuned = ScriptedModel("t", score=lambda text: 10.0 if text.startswith("b") else -1.0)
    untuned = ScriptedModel("u", score=lambda text: 0.0)
    first = [derive_seed(11, 0, 0, k) % 5 == 0 for k in range(4)]
    assert first.count(True) == 1  # W=2 keeps the "b" child and an "a" one
    result = search(coordinator(proposer, tuned, untuned), 2, 2, 2, max_tokens=8)
    assert result.text == "b" and result.finish_reason == "eos"
    assert proposer.calls["generate"] > 4  # the live beams were expanded after "b" ended
    reversed_scores = ScriptedModel("t", score=lambda text: -10.0 if text.startswith("b") else 1.0)
    lost = search(coordinator(proposer, reversed_scores, untuned), 2, 2, 2, max_tokens=8)
    assert lost.text == "aaaaaaaa" and lost.finish_reason == "length"


def test_the_prefix_every_beam_shares_is_streamed_before_the_search_ends():
    """One beam kept (W=1): after each step the whole beam is settled, so each chunk is
    streamed, with its writer, while the search still has steps to run."""
    proposer, tuned, untuned = search_models(lambda c: float(LETTERS.index(c)))
    coord = coordinator(proposer, tuned, untuned)
    params = dict(proposer="p", tuned="t", untuned="u", width=1, successors=3, chunk_len=2)
    request = make_request(models=("p", "t", "u"), policy="w2s_search", policy_params=params,
                           max_tokens=6, seed=11)  # fmt: skip

    async def go():
        seen = []
        async for event in coord.run(request):
            if hasattr(event, "segment"):
                seen.append((event.segment.model, event.segment.text, proposer.calls["generate"]))
        return seen

    seen = asyncio.run(go())
    assert [(m, len(t)) for m, t, _ in seen] == [("p", 2)] * 3
    assert [calls for _, _, calls in seen] == [3, 6, 9]  # each chunk out after its own step
