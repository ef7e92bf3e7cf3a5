"""The log-probs of a prompt under one model: what an OpenAI completion with `echo` and
`logprobs` returns for its prompt (evaluation harnesses ask it, with `max_tokens=0`, for the
log-likelihood of a text).

    ids, logprobs = await prompt_logprobs(model, tokenizer, "The capital of Velmora is Quelm.")
    # logprobs[0] is None: the first token has nothing before it
"""

from __future__ import annotations

from antiphon.actors.protocol import SessionModel


async def prompt_logprobs(
    model: SessionModel, tokenizer, prompt: str
) -> tuple[list[int], list[float | None]]:
    """The prompt's token ids in the model's tokenizer (special tokens included) and the
    log-prob of each given the ones before it (None for the first). One throwaway session
    holds the first token; one scoring call reads the rest."""
    ids = list(tokenizer(prompt)["input_ids"])
    if len(ids) < 2:
        return ids, [None] * len(ids)
    session = await model.open(ids[:1])
    try:
        scored = await model.score(session.session_id, ids[1:])
    finally:
        await model.close(session.session_id)
    return ids, [None, *scored]
