"""The OpenAI `logprobs` of an answer, from its segments: each chosen token with its log-prob
under the model that wrote it (the segment's writer) and its text in that model's tokenizer,
in the chat layout (`content: [{token, logprob, bytes, ...}]`) or the completions' legacy one
(`tokens`, `token_logprobs`, `text_offset`); the writer of each token in the extra field. With
alternatives asked for, each position also lists its writer's most likely tokens there.

    tokens = await written_tokens(result.segments, backend.token_texts)
    choice.logprobs = chat_logprobs(tokens)          # or completion_logprobs(tokens, offset=0)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from antiphon.coordinator.scoring import ScoredPrompt
from antiphon.deploy import api
from antiphon.sequence import Segment

# (model, token ids) -> each token's text in that model's tokenizer
TokenTexts = Callable[[str, Sequence[int]], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class WrittenToken:
    text: str  # in its writer's tokenizer; "" for a special token
    logprob: float | None  # under its writer's sampling; None: a prompt's first token
    model: str  # its writer (for a prompt token: the model that scored it)
    # the writer's most likely tokens here, (text, log-prob) best first, when asked for
    top: tuple[tuple[str, float], ...] = ()


async def written_tokens(
    segments: Sequence[Segment], token_texts: TokenTexts
) -> list[WrittenToken]:
    """The chosen tokens of `segments`, in order, with the alternatives their writers gave."""
    tokens: list[WrittenToken] = []
    for seg in segments:
        texts = await token_texts(seg.model, seg.token_ids)
        tops = [await _alternatives(seg.model, top, token_texts) for top in seg.top_logprobs]
        tops += [()] * (len(texts) - len(tops))  # none asked (or a resumed segment without)
        tokens += [
            WrittenToken(text, logprob, seg.model, top)
            for text, logprob, top in zip(texts, seg.logprobs, tops, strict=True)
        ]
    return tokens


async def _alternatives(
    model: str, top: Sequence[tuple[int, float]], token_texts: TokenTexts
) -> tuple[tuple[str, float], ...]:
    texts = await token_texts(model, [token for token, _ in top])
    return tuple(zip(texts, (logprob for _, logprob in top), strict=True))


async def prompt_tokens(
    model: str, scored: ScoredPrompt, token_texts: TokenTexts
) -> list[WrittenToken]:
    """A prompt's tokens as scored by `model` (antiphon.coordinator.scoring)."""
    texts = await token_texts(model, scored.ids)
    tops = [await _alternatives(model, top, token_texts) for top in scored.top]
    return [
        WrittenToken(text, logprob, model, top)
        for text, logprob, top in zip(texts, scored.logprobs, tops, strict=True)
    ]


def chat_logprobs(tokens: Sequence[WrittenToken]) -> api.ChatLogprobs:
    return api.ChatLogprobs(
        content=[
            api.TokenLogprob(
                token=t.text,
                logprob=t.logprob,
                bytes=list(t.text.encode()),
                top_logprobs=[
                    api.TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))
                    for text, lp in t.top
                ],
                antiphon_model=t.model,
            )  # fmt: skip
            for t in tokens
        ]
    )


def completion_logprobs(
    tokens: Sequence[WrittenToken], offset: int, alternatives: int = 0
) -> api.CompletionLogprobs:
    """The legacy layout; `offset`: where the first token starts in the choice's text (a
    streamed chunk's tokens follow the chunks before it); `alternatives`: how many were
    asked for (0: no `top_logprobs`)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return api.CompletionLogprobs(
        tokens=[t.text for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        text_offset=offsets,
        antiphon_models=[t.model for t in tokens],
        top_logprobs=[None if t.logprob is None else dict(t.top) for t in tokens]
        if alternatives
        else None,
    )
