"""The weak-to-strong search's scores on real checkpoints: after every step, each beam's
incremental score (parent + chunk, from forked guide sessions) equals a full re-score of its
response by fresh guide sessions, when the guides share the proposer's tokenizer and when they
do not (their tokenizer merges characters into words, so a chunk boundary inside a word
tokenizes differently from the whole word and the guides must re-tokenize at the boundary)."""

from __future__ import annotations

import asyncio

import pytest

from antiphon.actors.engine import ModelEngine
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.commit import apply
from antiphon.coordinator.executors.base import ExecutionContext
from antiphon.coordinator.executors.search import Beam, SearchExecutor
from antiphon.coordinator.sessions import ModelSession, RequestSessions
from antiphon.policies.base import SearchStep
from antiphon.zoo.random_model import write_random_checkpoint
from antiphon.zoo.tokenizer import build_alt_tokenizer
from tests.factories import char_trim, make_request

PROMPT = "Review of the lamp:"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    alt_random = write_random_checkpoint(
        tmp_path_factory.mktemp("alt") / "alt-random", seed=5, tokenizer=build_alt_tokenizer()
    )
    paths = {
        "strong": "zoo:strong",
        "tuned": "zoo:guide-tuned",
        "untuned": "zoo:guide-untuned",
        "alt_tuned": "zoo:alt-tok",
        "alt_untuned": str(alt_random),
    }
    built = {n: ModelEngine(ModelSpec(name=n, path=p)) for n, p in paths.items()}
    yield built

    async def shutdown() -> None:
        for e in built.values():
            await e.shutdown()

    asyncio.run(shutdown())


async def full_log_ratio(ex: SearchExecutor, d: SearchStep, beam: Beam) -> float:
    """The reference: fresh guide sessions of the search's root score the beam's whole
    response (every chunk since the search began), tokenized as a whole."""
    chunks = ex.root.committed + beam.chunks
    total = 0.0
    for name, sign in ((d.tuned, 1.0), (d.untuned, -1.0)):
        guide: ModelSession = ex.sessions[name]
        ids = guide.ids_for(chunks)
        if chunks[-1].model_finish == "eos" and guide.info.tokenizer_fingerprint != (
            ex.sessions.fingerprint(d.proposer)
        ):
            ids.append(guide.info.eos_token_ids[0])
        session = await guide.model.open(ex.root.ids[name])
        try:
            total += sign * sum(await guide.model.score(session.session_id, ids))
        finally:
            await guide.model.close(session.session_id)
    return total


def run_search(engines, tuned: str, untuned: str, seed: int):
    """A CBS(2, 2, 5) search of up to 30 tokens: after each step, every beam's (incremental,
    full) score pair; and the texts of the beams (with their chunks) it ever held."""
    d = SearchStep("strong", tuned, untuned, width=2, successors=2, chunk_len=5)
    request = make_request(prompt=PROMPT, models=d.models(), max_tokens=30, seed=seed,
                           temperature=1.0)  # fmt: skip
    tokenizers = {n: load_tokenizer(e.spec.path) for n, e in engines.items()}

    async def go():
        infos = {n: await engines[n].info() for n in d.models()}
        sessions = RequestSessions(engines, tokenizers, infos, PROMPT)
        ex = SearchExecutor(ExecutionContext(request, sessions, char_trim))
        state, pairs, held = request.initial_state(), [], []
        while not state.done and state.tokens_left > 0:
            state = apply(state, await ex.run(d, state), char_trim)
            for b in ex.beams:
                pairs.append((b.score, await full_log_ratio(ex, d, b)))
                held.append([c.text for c in ex.root.committed + b.chunks])
        await ex.settle(state)
        await sessions.close_all()
        return pairs, held, state

    return asyncio.run(go())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_incremental_scores_equal_a_full_rescore_same_tokenizer(engines, seed):
    pairs, _, state = run_search(engines, "tuned", "untuned", seed)
    assert len(pairs) >= 4  # several steps, several beams
    for incremental, full in pairs:
        assert incremental == pytest.approx(full, abs=1e-3)
    assert state.segments and all(s.kind == "search" for s in state.segments)


@pytest.mark.slow
def test_incremental_scores_equal_a_full_rescore_other_tokenizer(engines):
    held_all = []
    for seed in (1, 2, 3):
        pairs, held, _ = run_search(engines, "alt_tuned", "alt_untuned", seed)
        assert len(pairs) >= 4
        for incremental, full in pairs:
            assert incremental == pytest.approx(full, abs=1e-3)
        held_all += held
    # the boundaries mattered: chunk by chunk, the guides' tokens would have been others
    tok = build_alt_tokenizer()
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert any(encode("".join(t)) != sum((encode(c) for c in t), []) for t in held_all)


def test_a_chunk_boundary_inside_a_word_retokenizes_the_parents_last_token():
    """Why the re-tokenization matters: the guides' tokenizer merges across the boundary."""
    tok = build_alt_tokenizer()
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    parent, whole = encode("Review of th"), encode("Review of the")
    assert whole[: len(parent) - 1] == parent[:-1] and whole[len(parent) - 1] != parent[-1]
