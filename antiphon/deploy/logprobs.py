"""The OpenAI `logprobs` of an answer, from its segments: each chosen token with its log-prob
under the model that wrote it (the segment's writer) and its text in that model's tokenizer,
in the chat layout (`content: [{token, logprob, bytes, ...}]`) or the completions' legacy one
(`tokens`, `token_logprobs`, `text_offset`); the writer of each token in the extra field.

    tokens = await written_tokens(result.segments, backend.token_texts)
    choice.logprobs = chat_logprobs(tokens)          # or completion_logprobs(tokens, offset=0)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from antiphon.deploy import api
from antiphon.sequence import Segment

# (model, token ids) -> each token's text in that model's tokenizer
TokenTexts = Callable[[str, Sequence[int]], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class WrittenToken:
    text: str  # in its writer's tokenizer; "" for a special token
    logprob: float | None  # under its writer's sampling; None: a prompt's first token
    model: str  # its writer (for a prompt token: the model that scored it)


async def written_tokens(
    segments: Sequence[Segment], token_texts: TokenTexts
) -> list[WrittenToken]:
    """The chosen tokens of `segments`, in order."""
    tokens: list[WrittenToken] = []
    for seg in segments:
        texts = await token_texts(seg.model, seg.token_ids)
        tokens += [
            WrittenToken(text, logprob, seg.model)
            for text, logprob in zip(texts, seg.logprobs, strict=True)
        ]
    return tokens


async def prompt_tokens(
    model: str, ids: Sequence[int], logprobs: Sequence[float | None], token_texts: TokenTexts
) -> list[WrittenToken]:
    """A prompt's tokens as scored by `model` (antiphon.coordinator.scoring)."""
    texts = await token_texts(model, ids)
    return [WrittenToken(t, lp, model) for t, lp in zip(texts, logprobs, strict=True)]


def chat_logprobs(tokens: Sequence[WrittenToken]) -> api.ChatLogprobs:
    return api.ChatLogprobs(
        content=[
            api.TokenLogprob(
                token=t.text, logprob=t.logprob, bytes=list(t.text.encode()), antiphon_model=t.model
            )
            for t in tokens
        ]
    )


def completion_logprobs(tokens: Sequence[WrittenToken], offset: int) -> api.CompletionLogprobs:
    """The legacy layout; `offset`: where the first token starts in the choice's text (a
    streamed chunk's tokens follow the chunks before it)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return api.CompletionLogprobs(
        tokens=[t.text for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        text_offset=offsets,
        antiphon_models=[t.model for t in tokens],
    )
