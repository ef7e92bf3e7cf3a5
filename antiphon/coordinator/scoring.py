"""The log-probs of a prompt under one model: what an OpenAI completion with `echo` and
`logprobs` returns for its prompt (evaluation harnesses ask it, with `max_tokens=0`, for the
log-likelihood of a text, and with `logprobs=1` whether each token was the model's greedy one).

    scored = await prompt_logprobs(model, tokenizer, "The capital of Velmora is Quelm.", top_k=1)
    # scored.logprobs[0] is None: the first token has nothing before it (nor alternatives)
"""

from __future__ import annotations

from dataclasses import dataclass

from antiphon.actors.protocol import SessionModel


@dataclass(frozen=True, slots=True)
class ScoredPrompt:
    ids: list[int]  # the prompt in the model's tokenizer (special tokens included)
    logprobs: list[float | None]  # of each token given the ones before it; None for the first
    top: list[tuple[tuple[int, float], ...]]  # top_k asked: each position's best (id, log p)


async def prompt_logprobs(
    model: SessionModel, tokenizer, prompt: str, top_k: int = 0
) -> ScoredPrompt:
    """The prompt scored by `model`. One throwaway session holds the first token; one
    scoring call reads the rest (teacher forcing where alternatives are asked for)."""
    ids = list(tokenizer(prompt)["input_ids"])
    if len(ids) < 2:
        return ScoredPrompt(ids, [None] * len(ids), [()] * len(ids))
    session = await model.open(ids[:1])
    try:
        if top_k:
            forced = await model.teacher_force(session.session_id, ids[1:], top_k)
            scored, top = list(forced.logprobs), list(forced.top)
        else:
            scored, top = await model.score(session.session_id, ids[1:]), [()] * (len(ids) - 1)
    finally:
        await model.close(session.session_id)
    return ScoredPrompt(ids, [None, *scored], [(), *top])
