"""The session engine on a tiny random checkpoint, loaded through the real loader (CPU, no Ray).

    pytest tests/actors/test_engine.py -q

Every reference is computed by the plain transformers model (`model.generate`, a full forward
over the whole sequence), never by the engine itself.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from antiphon.actors.engine import ModelEngine
from antiphon.actors.gate import save_gate
from antiphon.checkpoint import load_checkpoint
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest, Overloaded, PromptTooLong, SessionLost
from antiphon.messages import SamplingParams

PROMPTS = [
    "Hello world",
    "The cat sat",
    "abc",
    "Once upon a time",
    "x",
    "42 + 17 =",
    "Zz",
    "qwerty",
]


def run(coro):
    return asyncio.run(coro)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture
def engine(spec):
    eng = ModelEngine(spec)
    yield eng
    run(eng.shutdown())


def make_engine(spec: ModelSpec, **changes) -> ModelEngine:
    return ModelEngine(spec.model_copy(update=changes))


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,  # write all n tokens, as the engine does with ignore_eos
    )
    return out[0, len(ids) :].tolist()


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) from one forward over the whole sequence, (len(ids)-1,)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# Correctness of one session


def test_greedy_equals_model_generate_across_calls_and_appends(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("Hello world")["input_ids"]

    async def go():
        s = await engine.open(prompt)
        parts = [await engine.generate(s.session_id, greedy(n)) for n in (5, 1, 9)]
        written = [t for g in parts for t in g.token_ids]
        foreign = tokenizer(" and then")["input_ids"]
        info = await engine.append(s.session_id, foreign)
        after = await engine.generate(s.session_id, greedy(12))
        return parts, written, foreign, info, after

    parts, written, foreign, info, after = run(go())
    assert written == hf_greedy(model, prompt, 15)
    assert [g.finish_reason for g in parts] == ["length"] * 3
    sequence = prompt + written + foreign
    assert info.length == len(sequence)
    assert list(after.token_ids) == hf_greedy(model, sequence, 12)
    assert after.length == len(sequence) + 12
    # reported log-probs are the model's own
    expected = full_logprobs(model, sequence + list(after.token_ids))[-12:]
    assert torch.allclose(torch.tensor(after.logprobs), expected, atol=1e-4)


def test_text_prompt_equals_its_token_ids(engine, reference):
    _, tokenizer = reference

    async def go():
        a = await engine.open("Once upon")
        b = await engine.open(tokenizer("Once upon")["input_ids"])
        ga = await engine.generate(a.session_id, greedy(8))
        gb = await engine.generate(b.session_id, greedy(8))
        return ga, gb

    ga, gb = run(go())
    assert ga.token_ids == gb.token_ids
    assert ga.text == tokenizer.decode(list(ga.token_ids), skip_special_tokens=True)


def test_score_equals_full_forward_and_leaves_session_unchanged(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("The cat sat")["input_ids"]
    continuation = tokenizer(" on the mat.")["input_ids"]

    async def go():
        s = await engine.open(prompt)
        first = await engine.generate(s.session_id, greedy(4))
        scores = await engine.score(s.session_id, continuation)
        again = await engine.score(s.session_id, continuation)
        after = await engine.generate(s.session_id, greedy(6))
        return first, scores, again, after

    first, scores, again, after = run(go())
    sequence = prompt + list(first.token_ids)
    expected = full_logprobs(model, sequence + continuation)[-len(continuation) :]
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-4)
    assert torch.allclose(torch.tensor(again), expected, atol=1e-4)
    assert after.length == len(sequence) + 6  # score appended nothing
    assert list(after.token_ids) == hf_greedy(model, sequence, 6)


def test_score_with_keep_scores_and_appends_in_one_call(engine, reference):
    """What a search's guide does per chunk: the chunk's log-probs, and the chunk kept, even
    when a sibling session already holds the same tokens (no prefix reuse may skip them)."""
    model, tokenizer = reference
    prompt = tokenizer("The dog ran")["input_ids"]
    chunk, more = tokenizer(" far away")["input_ids"], tokenizer(" home")["input_ids"]

    async def go():
        s = await engine.open(prompt)
        sibling, forked = await engine.fork(s.session_id, 2)
        await engine.append(sibling, chunk + more)  # the same tokens, cached elsewhere
        kept = await engine.score(forked, chunk, keep=True)
        after = await engine.score(forked, more)
        at_prompt = await engine.fork(forked, 1, length=len(prompt))
        again = await engine.score(at_prompt[0], chunk)
        return kept, after, again

    kept, after, again = run(go())
    expected = full_logprobs(model, prompt + chunk + more)
    assert torch.allclose(torch.tensor(kept), expected[len(prompt) - 1 : -len(more)], atol=1e-4)
    assert torch.allclose(torch.tensor(after), expected[-len(more) :], atol=1e-4)
    assert torch.allclose(torch.tensor(again), torch.tensor(kept), atol=1e-4)  # fork at length


def test_fork_children_continue_like_fresh_sessions(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("abc")["input_ids"]

    async def go():
        s = await engine.open(prompt)
        head = await engine.generate(s.session_id, greedy(5))
        children = await engine.fork(s.session_id, 3)
        extra = tokenizer("Q")["input_ids"]
        await engine.append(children[1], extra)
        outs = await asyncio.gather(*(engine.generate(c, greedy(7)) for c in children))
        parent = await engine.generate(s.session_id, greedy(7))
        return head, extra, outs, parent, children

    head, extra, outs, parent, children = run(go())
    prefix = prompt + list(head.token_ids)
    expected = hf_greedy(model, prefix, 7)
    assert len(set(children)) == 3
    assert list(outs[0].token_ids) == expected
    assert list(outs[2].token_ids) == expected
    assert list(parent.token_ids) == expected  # the parent is untouched by its children
    assert list(outs[1].token_ids) == hf_greedy(model, prefix + extra, 7)


def test_truncate_then_generate_equals_fresh_session(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("Hello world")["input_ids"]

    async def go():
        s = await engine.open(prompt)
        g = await engine.generate(s.session_id, greedy(10))
        cut = len(prompt) + 3
        info = await engine.truncate(s.session_id, cut)
        again = await engine.generate(s.session_id, greedy(8))
        deep = await engine.truncate(s.session_id, 2)  # into the prompt
        third = await engine.generate(s.session_id, greedy(4))
        return g, cut, info, again, deep, third

    g, cut, info, again, deep, third = run(go())
    kept = (prompt + list(g.token_ids))[:cut]
    assert info.length == cut
    assert list(again.token_ids) == hf_greedy(model, kept, 8)
    assert deep.length == 2
    assert list(third.token_ids) == hf_greedy(model, prompt[:2], 4)


def test_each_call_feeds_only_its_new_tokens(engine, reference):
    _, tokenizer = reference
    prompt = tokenizer("Once upon a time")["input_ids"]
    foreign = tokenizer(", there")["input_ids"]

    async def go():
        before = engine.stats().forward_tokens
        s = await engine.open(prompt)
        after_open = engine.stats().forward_tokens
        g1 = await engine.generate(s.session_id, greedy(6))
        after_gen = engine.stats().forward_tokens
        await engine.append(s.session_id, foreign)
        after_append = engine.stats().forward_tokens
        g2 = await engine.generate(s.session_id, greedy(4))
        return before, after_open, g1, after_gen, after_append, g2

    before, after_open, g1, after_gen, after_append, g2 = run(go())
    # the prompt's last token waits for generate, which needs its logits
    assert after_open - before == len(prompt) - 1
    assert g1.new_tokens_computed == 6 == after_gen - after_open
    # the last generated token + the appended ones but the last
    assert after_append - after_gen == len(foreign)
    assert g2.new_tokens_computed == 4


def test_generate_with_prefix_equals_append_then_generate_in_fewer_passes(engine, reference):
    """The fused call (one turn of collaboration: the other model's tokens, then mine) writes
    what append + generate write, computes the same positions, and saves the append's pass."""
    model, tokenizer = reference
    prompt = tokenizer("Once upon a time")["input_ids"]
    foreign = tokenizer(", there was")["input_ids"]

    async def turn(fused: bool):
        s = await engine.open(prompt)
        first = await engine.generate(s.session_id, greedy(5, logprobs_top_k=2))
        before = engine.stats()
        if fused:
            g = await engine.generate(s.session_id, greedy(7, logprobs_top_k=2), foreign)
        else:
            await engine.append(s.session_id, foreign)
            g = await engine.generate(s.session_id, greedy(7, logprobs_top_k=2))
        after = engine.stats()
        await engine.close(s.session_id)
        passes = after.forward_passes - before.forward_passes
        return first, g, passes, after.forward_tokens - before.forward_tokens

    first, two_calls, passes_two, fed_two = run(turn(fused=False))
    first_again, fused, passes_fused, fed_fused = run(turn(fused=True))
    assert first_again.token_ids == first.token_ids
    assert fused.token_ids == two_calls.token_ids
    assert list(fused.token_ids) == hf_greedy(model, prompt + list(first.token_ids) + foreign, 7)
    assert fused.logprobs == pytest.approx(two_calls.logprobs, abs=1e-5)
    assert [[t for t, _ in alts] for alts in fused.top_logprobs] == [
        [t for t, _ in alts] for alts in two_calls.top_logprobs
    ]
    assert fused.length == two_calls.length == len(prompt) + 5 + len(foreign) + 7
    # the same positions (the pending token, the prefix, the new tokens but the last) ...
    assert fed_fused == fed_two == len(foreign) + 7
    assert fused.new_tokens_computed == len(foreign) + 7
    # ... in one pass less: the prefix rides with the pending token into the first step
    assert passes_fused == passes_two - 1 == 7


def test_generate_without_session_opens_one_like_open_then_generate(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("The cat sat")["input_ids"]

    async def go():
        before = engine.stats()
        fused = await engine.generate(None, greedy(6), prompt)
        between = engine.stats()
        s = await engine.open(prompt)
        two_calls = await engine.generate(s.session_id, greedy(6))
        after = engine.stats()
        more = await engine.generate(fused.session_id, greedy(3), [5, 6])  # a live session
        await engine.close(fused.session_id)
        await engine.close(s.session_id)
        return fused, two_calls, more, before, between, after

    fused, two_calls, more, before, between, after = run(go())
    assert fused.token_ids == two_calls.token_ids
    assert list(fused.token_ids) == hf_greedy(model, prompt, 6)
    assert fused.session_id != two_calls.session_id and fused.length == len(prompt) + 6
    assert fused.new_tokens_computed == len(prompt) + 5
    assert between.forward_tokens - before.forward_tokens == len(prompt) + 5
    assert after.forward_tokens - between.forward_tokens == len(prompt) + 5
    assert between.forward_passes - before.forward_passes == 6  # the prompt with the 1st token
    assert after.forward_passes - between.forward_passes == 7
    assert list(more.token_ids) == hf_greedy(model, prompt + list(fused.token_ids) + [5, 6], 3)


def test_refused_generate_with_prefix_appends_nothing(spec):
    eng = make_engine(spec)
    try:

        async def go():
            s = await eng.open([5] * (eng.max_context - 4))
            with pytest.raises(PromptTooLong, match="prefix"):
                await eng.generate(s.session_id, greedy(2), [6] * 4)  # fills it: no room
            with pytest.raises(InvalidRequest, match="prefix_ids"):
                await eng.generate(s.session_id, greedy(2), [6, 10**6])
            with pytest.raises(InvalidRequest, match="prefix_ids"):
                await eng.generate(None, greedy(2))  # no session, no prompt
            with pytest.raises(PromptTooLong, match="no room"):
                await eng.generate(None, greedy(2), [5] * eng.max_context)
            live = eng.stats().live_sessions
            g = await eng.generate(s.session_id, greedy(2), [6] * 2)
            return live, g

        live, g = run(go())
    finally:
        run(eng.shutdown())
    assert live == 1  # the refused open + generate left no session behind
    assert g.length == eng.max_context  # nothing of the refused prefixes was appended


def test_calls_on_one_session_run_one_after_another(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("qwerty")["input_ids"]

    async def go():
        s = await engine.open(prompt)
        a, b = await asyncio.gather(
            engine.generate(s.session_id, greedy(5)), engine.generate(s.session_id, greedy(5))
        )
        return a, b

    a, b = run(go())
    assert list(a.token_ids + b.token_ids) == hf_greedy(model, prompt, 10)
    assert b.length == len(prompt) + 10


# ---------------------------------------------------------------------------------------------
# Sampling and stopping


def test_fixed_seed_repeats_alone_and_batched(engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=40, seed=7)

    async def go():
        alone = await engine.generate((await engine.open("Zz")).session_id, params)
        again = await engine.generate((await engine.open("Zz")).session_id, params)
        sessions = [await engine.open(p) for p in PROMPTS[:5]]
        target = await engine.open("Zz")
        noisy = SamplingParams(max_new_tokens=20, temperature=1.3)
        outs = await asyncio.gather(
            engine.generate(target.session_id, params),
            *(engine.generate(s.session_id, noisy) for s in sessions),
        )
        other_seed = await engine.generate(
            (await engine.open("Zz")).session_id,
            SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=40, seed=8),
        )
        return alone, again, outs[0], other_seed

    alone, again, batched, other_seed = run(go())
    assert alone.token_ids == again.token_ids == batched.token_ids
    assert other_seed.token_ids != alone.token_ids


def test_stop_token_ids_and_stop_strings(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("Hello world")["input_ids"]
    expected = hf_greedy(model, prompt, 20)
    stop_id = expected[6]
    first = expected.index(stop_id)
    stop_text = tokenizer.decode(expected[8:10], skip_special_tokens=True)

    async def go():
        a = await engine.generate(
            (await engine.open(prompt)).session_id, greedy(20, stop_token_ids=(stop_id,))
        )
        b = await engine.generate(
            (await engine.open(prompt)).session_id, greedy(20, stop_strings=(stop_text,))
        )
        return a, b

    a, b = run(go())
    assert a.finish_reason == "stop"
    assert list(a.token_ids) == expected[: first + 1]  # the stop token is returned
    full_text = tokenizer.decode(expected, skip_special_tokens=True)
    cut = full_text.index(stop_text)
    assert b.finish_reason == "stop"
    assert b.text == full_text[:cut]
    # ids run up to and including the token that completed the stop string
    completed_at = next(
        i
        for i in range(len(expected))
        if stop_text in tokenizer.decode(expected[: i + 1], skip_special_tokens=True)
    )
    assert list(b.token_ids) == expected[: completed_at + 1]
    assert b.length == len(prompt) + completed_at + 1


def test_top_logprobs_are_sorted_and_start_with_the_greedy_token(engine):
    async def go():
        s = await engine.open("abc")
        return await engine.generate(s.session_id, greedy(5, logprobs_top_k=3))

    g = run(go())
    assert len(g.top_logprobs) == 5
    for token, logprob, top in zip(g.token_ids, g.logprobs, g.top_logprobs, strict=True):
        assert len(top) == 3
        assert top[0][0] == token and abs(top[0][1] - logprob) < 1e-6
        assert top[0][1] >= top[1][1] >= top[2][1]


def test_eos_stops_unless_ignored(tmp_path):
    from transformers import GenerationConfig

    from tests.factories import make_tiny_model

    directory = make_tiny_model(tmp_path / "eos-model", seed=3)
    model, tokenizer = load_checkpoint(ModelSpec(name="e", path=str(directory)))
    prompt = tokenizer("abc")["input_ids"]
    expected = hf_greedy(model, prompt, 6)
    # declare the third greedy token an end-of-sequence token, as a checkpoint's config may
    config = GenerationConfig.from_model_config(model.config)
    config.eos_token_id = [tokenizer.eos_token_id, expected[2]]
    config.save_pretrained(directory)
    first = next(i for i, t in enumerate(expected) if t in config.eos_token_id)
    eng = ModelEngine(ModelSpec(name="e", path=str(directory)))
    try:

        async def go():
            stopped = await eng.generate(
                (await eng.open(prompt)).session_id, SamplingParams(max_new_tokens=6)
            )
            ignored = await eng.generate((await eng.open(prompt)).session_id, greedy(6))
            return await eng.info(), stopped, ignored

        info, stopped, ignored = run(go())
    finally:
        run(eng.shutdown())
    assert expected[2] in info.eos_token_ids
    assert stopped.finish_reason == "eos"
    assert list(stopped.token_ids) == expected[: first + 1]
    assert list(ignored.token_ids) == expected and ignored.finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# The deferral gate


def reference_gates(model, ids: list[int], weight: torch.Tensor, bias: float) -> torch.Tensor:
    """sigmoid(w . h_t + b) with h_t the final-norm hidden state at every position of ids."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0]
    return torch.sigmoid(hidden.float() @ weight + bias)


def test_gate_values_and_early_stop(spec, reference, tmp_path):
    model, tokenizer = reference
    hidden_size = model.config.hidden_size
    weight = torch.randn(hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    gate_file = save_gate(tmp_path / "gate.safetensors", weight, bias=0.1)
    eng = make_engine(spec, gate_path=str(gate_file))
    prompt = tokenizer("Hello world")["input_ids"]
    try:

        async def free_run():
            s = await eng.open(prompt)
            return await eng.generate(s.session_id, greedy(12))

        free = run(free_run())
        assert run(eng.info()).has_gate
        # gate i is computed where the logits that chose token i are read
        sequence = prompt + list(free.token_ids)
        expected = reference_gates(model, sequence, weight, 0.1)[len(prompt) - 1 : -1]
        assert torch.allclose(torch.tensor(free.gates), expected, atol=1e-4)
        assert len(free.gates) == 12

        # a threshold between the running max before step k and the gate at step k stops at k
        gates = list(free.gates)
        k = next(i for i in range(2, 12) if gates[i] > max(gates[:i]))
        threshold = (gates[k] + max(gates[:k])) / 2

        async def gated_run():
            s = await eng.open(prompt)
            g = await eng.generate(s.session_id, greedy(12, gate_threshold=threshold))
            rest = await eng.generate(s.session_id, greedy(12 - k))
            return g, rest

        gated, rest = run(gated_run())
    finally:
        run(eng.shutdown())
    assert gated.finish_reason == "gate"
    assert gated.token_ids == free.token_ids[:k]  # up to, not including, the gated token
    assert len(gated.gates) == k + 1
    assert gated.length == len(prompt) + k
    assert rest.token_ids == free.token_ids[k:]  # the session carries on where it stopped


def test_gate_file_found_next_to_checkpoint(tmp_path):
    from tests.factories import make_tiny_model

    directory = make_tiny_model(tmp_path / "gated", seed=2)
    save_gate(directory, torch.zeros(64), bias=0.0)
    eng = ModelEngine(ModelSpec(name="gated", path=str(directory)))
    try:

        async def go():
            s = await eng.open("abc")
            return await eng.info(), await eng.generate(s.session_id, greedy(3))

        info, g = run(go())
    finally:
        run(eng.shutdown())
    assert info.has_gate
    assert g.gates == pytest.approx((0.5, 0.5, 0.5))


def test_a_gate_published_by_moving_its_link_applies_to_the_calls_after_it(tmp_path):
    """The served link moves to another gate while a session is open: the next generate call
    reads the new gate and names it, info() names it, and a bad file keeps the old gate."""
    from tests.factories import make_tiny_model

    directory = make_tiny_model(tmp_path / "gated", seed=2)
    versions = tmp_path / "versions"
    for name, bias in (("v1", 0.0), ("v2", 2.0)):
        (versions / name).mkdir(parents=True)
        save_gate(versions / name, torch.zeros(64), bias=bias)
    (versions / "bad").mkdir()
    save_gate(versions / "bad", torch.zeros(32), bias=0.0)  # another model's hidden size
    served = tmp_path / "served"
    served.symlink_to(versions / "v1")
    eng = ModelEngine(ModelSpec(name="gated", path=str(directory),
                                gate_path=str(served / "gate.safetensors")))  # fmt: skip

    def move_link(to: str) -> None:
        (tmp_path / "next").symlink_to(versions / to)
        (tmp_path / "next").replace(served)  # atomically, as the policy store does

    async def go():
        s = await eng.open("abc")
        first = await eng.generate(s.session_id, greedy(2))
        move_link("v2")
        second = await eng.generate(s.session_id, greedy(2))
        info = await eng.info()
        move_link("bad")
        third = await eng.generate(s.session_id, greedy(2))
        return first, second, info, third

    try:
        first, second, info, third = run(go())
    finally:
        run(eng.shutdown())
    assert first.gates == pytest.approx((0.5, 0.5))
    assert second.gates == pytest.approx((torch.sigmoid(torch.tensor(2.0)).item(),) * 2)
    assert first.gate and second.gate and first.gate != second.gate
    assert info.gate_fingerprint == second.gate
    assert third.gate == second.gate and third.gates == second.gates  # the bad file is refused


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_sessions_batch_and_match_sequential(spec):
    eng = make_engine(spec, name="batched")
    try:

        async def sequential():
            outs = []
            for p in PROMPTS:
                s = await eng.open(p)
                outs.append(await eng.generate(s.session_id, greedy(16)))
            return outs

        async def concurrent():
            sessions = await asyncio.gather(*(eng.open(p) for p in PROMPTS))
            return await asyncio.gather(*(eng.generate(s.session_id, greedy(16)) for s in sessions))

        p0 = eng.stats().forward_passes
        one_by_one = run(sequential())
        p1 = eng.stats().forward_passes
        together = run(concurrent())
        p2 = eng.stats().forward_passes
    finally:
        run(eng.shutdown())
    assert [g.token_ids for g in together] == [g.token_ids for g in one_by_one]
    for a, b in zip(together, one_by_one, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)
    sequential_passes, concurrent_passes = p1 - p0, p2 - p1
    assert sequential_passes == 8 * 16 + 7  # a prefill per prompt but "x" (a lone token)
    assert concurrent_passes < sequential_passes / 3  # decode steps shared, prefills too


def test_staggered_calls_join_and_leave_the_batch(spec):
    """Sessions start and stop at different times; every one still equals its solo run."""
    eng = make_engine(spec, name="staggered", max_batch_size=3)
    lengths = [3, 17, 9, 1, 12, 5, 8, 2]
    try:

        async def solo():
            outs = []
            for p, n in zip(PROMPTS, lengths, strict=True):
                s = await eng.open(p)
                outs.append(await eng.generate(s.session_id, greedy(n)))
            return outs

        async def staggered():
            async def one(p, n, delay):
                await asyncio.sleep(delay)
                s = await eng.open(p)
                first = await eng.generate(s.session_id, greedy(n))
                await eng.append(s.session_id, [10, 11])
                second = await eng.generate(s.session_id, greedy(3))
                return first, second

            return await asyncio.gather(
                *(
                    one(p, n, 0.002 * i)
                    for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))
                )
            )

        expected = run(solo())
        got = run(staggered())

        async def check():
            outs = []
            for (first, _), p in zip(got, PROMPTS, strict=True):
                s = await eng.open(p)
                await eng.append(s.session_id, list(first.token_ids) + [10, 11])
                outs.append(await eng.generate(s.session_id, greedy(3)))
            return outs

        seconds = run(check())
    finally:
        run(eng.shutdown())
    assert [f.token_ids for f, _ in got] == [g.token_ids for g in expected]
    assert [s.token_ids for _, s in got] == [g.token_ids for g in seconds]


def test_event_loop_stays_responsive_while_generating(engine):
    async def go():
        s = await engine.open("abc")
        task = asyncio.create_task(engine.generate(s.session_id, greedy(50)))
        ticks = 0
        while not task.done():
            # a short sleep, not sleep(0): a loop that never waits holds the GIL against the
            # model's thread and slows it hundreds of times
            await asyncio.sleep(0.001)
            ticks += 1
        return ticks, await task

    ticks, g = run(go())
    assert len(g.token_ids) == 50
    assert ticks > 10  # the loop ran other work while the model did


# ---------------------------------------------------------------------------------------------
# Bounds: eviction, expiry, lost sessions


def test_lru_eviction_by_session_count(spec):
    eng = make_engine(spec, max_sessions=2)
    try:

        async def go():
            a = await eng.open("abc")
            b = await eng.open("Zz")
            await eng.generate(a.session_id, greedy(2))  # a is now more recent than b
            c = await eng.open("qwerty")
            with pytest.raises(SessionLost, match="evicted"):
                await eng.generate(b.session_id, greedy(2))
            await eng.generate(a.session_id, greedy(2))
            await eng.generate(c.session_id, greedy(2))
            return eng.stats()

        stats = run(go())
    finally:
        run(eng.shutdown())
    assert stats.live_sessions == 2


def test_lru_eviction_by_cached_tokens(spec):
    eng = make_engine(spec, max_cached_tokens=40)
    try:

        async def go():
            a = await eng.open([5] * 20)
            b = await eng.open([6] * 15)
            g = await eng.generate(b.session_id, greedy(10))  # 45 tokens: a goes
            with pytest.raises(SessionLost, match=a.session_id):
                await eng.score(a.session_id, [5])
            with pytest.raises(PromptTooLong, match="40"):
                await eng.open([7] * 41)  # could never fit: nothing is evicted for it
            await eng.generate(b.session_id, greedy(1))
            return g, eng.stats()

        g, stats = run(go())
    finally:
        run(eng.shutdown())
    assert len(g.token_ids) == 10
    assert stats.cached_tokens <= 40


def test_full_engine_of_busy_sessions_is_overloaded(spec):
    eng = make_engine(spec, max_sessions=1)
    try:

        async def go():
            s = await eng.open("abc")
            busy = asyncio.create_task(eng.generate(s.session_id, greedy(100)))
            await asyncio.sleep(0)  # the generate call is queued before the open below
            with pytest.raises(Overloaded):
                await eng.open("Zz")
            await busy
            return await eng.open("Zz")  # idle now: evicted to make room

        run(go())
    finally:
        run(eng.shutdown())


def test_idle_sessions_expire(spec):
    eng = make_engine(spec, session_idle_timeout_s=0.05)
    try:

        async def go():
            s = await eng.open("abc")
            await asyncio.sleep(0.1)
            with pytest.raises(SessionLost, match="expired"):
                await eng.generate(s.session_id, greedy(2))
            t = await eng.open("abc")
            return await eng.generate(t.session_id, greedy(2))

        assert len(run(go()).token_ids) == 2
    finally:
        run(eng.shutdown())


def test_closed_and_unknown_sessions_are_lost(engine):
    async def go():
        s = await engine.open("abc")
        await engine.close(s.session_id)
        await engine.close(s.session_id)  # closing twice is fine
        await engine.close("never-opened")
        with pytest.raises(SessionLost, match="closed"):
            await engine.append(s.session_id, [5])
        with pytest.raises(SessionLost, match="unknown session 'nope'"):
            await engine.generate("nope", greedy(2))
        for call in (
            engine.score("nope", [1]),
            engine.fork("nope", 2),
            engine.truncate("nope", 1),
        ):
            with pytest.raises(SessionLost):
                await call

    run(go())


def test_session_ids_carry_the_prefix(spec):
    eng = ModelEngine(spec, id_prefix="replica7:")
    try:
        sid = run(eng.open("abc")).session_id
    finally:
        run(eng.shutdown())
    assert sid.startswith("replica7:") and len(sid) > len("replica7:")


# ---------------------------------------------------------------------------------------------
# Bad input: a typed error, and nothing else harmed


def test_bad_inputs_raise_typed_errors_and_harm_nothing(engine, reference):
    model, tokenizer = reference
    prompt = tokenizer("Hello world")["input_ids"]
    info = run(engine.info())

    async def go():
        s = await engine.open(prompt)
        other = await engine.open(prompt)
        bad_calls = [
            (PromptTooLong, engine.open([5] * (info.max_context + 1))),
            (InvalidRequest, engine.open([])),
            (InvalidRequest, engine.open([info.vocab_size])),
            (InvalidRequest, engine.open(b"abc")),
            (InvalidRequest, engine.append(s.session_id, [-1])),
            (InvalidRequest, engine.append(s.session_id, [1.5])),
            (PromptTooLong, engine.append(s.session_id, [5] * info.max_context)),
            (PromptTooLong, engine.score(s.session_id, [5] * info.max_context)),
            (InvalidRequest, engine.score(s.session_id, [10**6])),
            (InvalidRequest, engine.generate(s.session_id, {"max_new_tokens": 3})),
            (InvalidRequest, engine.truncate(s.session_id, len(prompt) + 1)),
            (InvalidRequest, engine.truncate(s.session_id, 0)),
            (InvalidRequest, engine.fork(s.session_id, 0)),
        ]
        for error, call in bad_calls:
            with pytest.raises(error):
                await call
        with pytest.raises(InvalidRequest, match="temperature"):
            SamplingParams(temperature=-1.0)
        a = await engine.generate(s.session_id, greedy(8))
        b = await engine.generate(other.session_id, greedy(8))
        return a, b

    a, b = run(go())
    expected = hf_greedy(model, prompt, 8)
    assert list(a.token_ids) == expected and list(b.token_ids) == expected
    assert a.length == len(prompt) + 8


def test_generate_on_a_full_context(spec):
    eng = make_engine(spec)
    try:

        async def go():
            full = await eng.open([5] * eng.max_context)
            with pytest.raises(PromptTooLong):
                await eng.generate(full.session_id, greedy(1))
            near = await eng.open([5] * (eng.max_context - 3))
            g = await eng.generate(near.session_id, greedy(10))
            return g

        g = run(go())
    finally:
        run(eng.shutdown())
    assert len(g.token_ids) == 3 and g.finish_reason == "length"
    assert g.length == eng.max_context


def test_engine_satisfies_the_protocol_and_reports_health(engine):
    from antiphon.actors.protocol import SessionModel

    assert isinstance(engine, SessionModel)
    engine.check_health()
    run(engine.shutdown())
    with pytest.raises(RuntimeError):
        engine.check_health()


def test_unknown_checkpoint_is_not_found():
    from antiphon.errors import NotFound

    with pytest.raises(NotFound):
        ModelEngine(ModelSpec(name="x", path="/nonexistent/checkpoint/dir"))


def test_stats_count_sessions_and_tokens(engine):
    async def go():
        s = await engine.open("abcd")
        await engine.generate(s.session_id, greedy(5))
        return engine.stats()

    stats = run(go())
    assert stats.live_sessions == 1
    assert stats.cached_tokens == 9
    assert stats.tokens_generated == 5


def test_concurrent_scores_and_appends_batch_correctly(spec, reference):
    """Prefill-type calls of different lengths share forward passes (right-padded rows)."""
    model, tokenizer = reference
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    continuations = [tokenizer(c)["input_ids"] for c in (" a", " bb!", " the end", "?")] * 2
    eng = make_engine(spec, name="prefills")
    try:

        async def go():
            sessions = await asyncio.gather(*(eng.open(p) for p in prompts))
            before = eng.stats().forward_passes
            scores = await asyncio.gather(
                *(eng.score(s.session_id, c) for s, c in zip(sessions, continuations, strict=True))
            )
            await asyncio.gather(
                *(eng.append(s.session_id, c) for s, c in zip(sessions, continuations, strict=True))
            )
            passes = eng.stats().forward_passes - before
            outs = await asyncio.gather(*(eng.generate(s.session_id, greedy(4)) for s in sessions))
            return scores, passes, outs

        scores, passes, outs = run(go())
    finally:
        run(eng.shutdown())
    assert passes < 16  # 8 scores + 8 appends, several to a pass
    for p, c, got, out in zip(prompts, continuations, scores, outs, strict=True):
        expected = full_logprobs(model, p + c)[-len(c) :]
        assert torch.allclose(torch.tensor(got), expected, atol=1e-4)
        assert list(out.token_ids) == hf_greedy(model, p + c, 4)


def test_bfloat16_engine_runs(spec):
    eng = make_engine(spec, dtype="bfloat16")
    try:

        async def go():
            s = await eng.open("abc")
            return await eng.info(), await eng.generate(s.session_id, greedy(5, logprobs_top_k=2))

        info, g = run(go())
    finally:
        run(eng.shutdown())
    assert info.dtype == "bfloat16" and next(eng.model.parameters()).dtype == torch.bfloat16
    assert len(g.token_ids) == 5 and all(lp <= 0 for lp in g.logprobs)


def test_prompt_logprobs_reuse_a_cached_prefix_and_equal_a_full_forward(engine, reference):
    """The switcher's prompts grow turn by turn (and end with a fixed question): each call
    forks the cached prompt that shares the longest prefix, so it feeds only the new part,
    and its log-probabilities still equal a full forward over the whole prompt."""
    model, tok = reference
    head = tok("Models take turns. Query: once upon a time.")["input_ids"]
    suffix = tok(" The answer is model ", add_special_tokens=False)["input_ids"]
    segments = [tok(f"<{i}> segment number {i} </{i}>", add_special_tokens=False)["input_ids"]
                for i in range(4)]  # fmt: skip
    candidates = tok("012", add_special_tokens=False)["input_ids"]

    async def turns():
        out, trace = [], []
        for seg in segments:
            trace += seg
            before = engine.stats().forward_tokens
            lp = await engine.prompt_next_token_logprobs(head + trace + suffix, candidates)
            out.append((head + trace + suffix, lp, engine.stats().forward_tokens - before))
        return out

    for i, (prompt, logprobs, fed) in enumerate(run(turns())):
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), -1)[candidates]
        assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)
        if i > 0:  # the head and the earlier trace came from the cache
            assert fed <= len(segments[i]) + len(suffix) + 1
    assert engine.stats().live_sessions <= 16  # the cache is bounded


def test_prompt_logprobs_of_a_too_long_prompt_fail_and_leave_no_session(engine):
    too_long = [5] * (engine.max_context + 1)

    async def go():
        with pytest.raises(PromptTooLong):
            await engine.prompt_next_token_logprobs(too_long, [1, 2])
        await engine.prompt_next_token_logprobs([5] * 20, [1])
        with pytest.raises(PromptTooLong):  # this time starting from the retained prompt
            await engine.prompt_next_token_logprobs(too_long, [1, 2])

    run(go())
    # the prompts' caches are retained for reuse, but no session is left open
    assert engine.stats().live_sessions == 0


def test_sessions_sharing_a_prompt_prefill_it_once_and_still_equal_model_generate(
    engine, reference
):
    """Prefix reuse: a session whose prompt shares a long prefix with a live session, or with
    one closed a moment ago, takes that prefix's cache and feeds only the rest."""
    model, tokenizer = reference
    shared = tokenizer("Q: Once upon a time there was a fox by the river.\nA:")["input_ids"]
    yes, no = (
        shared + tokenizer(e, add_special_tokens=False)["input_ids"] for e in (" Yes", " No")
    )

    async def go():
        a = await engine.open(yes)
        ga = await engine.generate(a.session_id, greedy(6))
        before = engine.stats().forward_tokens
        b = await engine.open(no)  # while a is live
        fed_b = engine.stats().forward_tokens - before
        gb = await engine.generate(b.session_id, greedy(6))
        await engine.close(a.session_id)
        await engine.close(b.session_id)
        before = engine.stats().forward_tokens
        again = await engine.generate(None, greedy(6), no)  # from b's retained cache
        fed_again = engine.stats().forward_tokens - before
        await engine.close(again.session_id)
        return ga, gb, fed_b, again, fed_again

    ga, gb, fed_b, again, fed_again = run(go())
    assert list(ga.token_ids) == hf_greedy(model, yes, 6)
    assert list(gb.token_ids) == hf_greedy(model, no, 6)
    common = next(i for i, (x, y) in enumerate(zip(yes, no, strict=False)) if x != y)
    assert common > len(shared) - 1
    assert fed_b == len(no) - 1 - common  # only what a's cache did not hold
    assert again.token_ids == gb.token_ids
    assert fed_again == 6  # the pending token and the new ones: the prompt was all cached
    assert engine.stats().live_sessions == 0
