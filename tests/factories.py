"""Factories for tests: tiny random-weight checkpoints written the way real ones are, and
the sequence values (segments, states, views, requests) that the pure parts take.

`make_tiny_model` writes a Llama-architecture checkpoint (safetensors) next to a character
tokenizer and returns the directory; the code under test then loads it through the ordinary
loader, exactly as a hub checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from antiphon.coordinator.request import GenerationRequest
from antiphon.messages import FinishReason as ModelFinishReason
from antiphon.sequence import Segment, SegmentKind, SequenceState, SequenceStatus, SequenceView
from antiphon.zoo.random_model import write_random_checkpoint
from antiphon.zoo.tokenizer import DEFAULT_ALPHABET
from antiphon.zoo.train import ModelShape


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_context: int = 512,
    alphabet: str = DEFAULT_ALPHABET,
) -> Path:
    """Write a random-weight causal LM + tokenizer to out_dir (HF format) and return it."""
    shape = ModelShape(hidden=hidden_size, layers=num_layers, heads=num_heads, context=max_context)
    return write_random_checkpoint(out_dir, seed=seed, shape=shape, alphabet=alphabet)


# ---------------------------------------------------------------------------------------------
# Sequence values, made by hand (one token per character, as the zoo's tokenizer has it)


def make_segment(
    text: str,
    model: str = "a",
    turn: int = 0,
    *,
    kind: SegmentKind = "write",
    model_finish: ModelFinishReason = "length",
    token_ids: tuple[int, ...] | None = None,
) -> Segment:
    """A segment of `text`, one token (and log-prob -1) per character unless ids are given."""
    ids = token_ids if token_ids is not None else tuple(range(100, 100 + len(text)))
    return Segment(model, ids, text, tuple(-1.0 for _ in ids), turn, kind, model_finish)


def make_state(
    *segments: Segment, max_tokens: int = 64, stop: tuple[str, ...] = (), **kw
) -> SequenceState:
    """A running state holding `segments`."""
    fields = dict(
        request_id="r", prompt="Q: ", models=("a", "b", "c"), max_tokens=max_tokens, stop=stop
    )
    fields.update(kw)
    return SequenceState(**fields, segments=segments, status=SequenceStatus.RUNNING)


def make_view(
    segments: tuple[Segment, ...] = (),
    *,
    models: tuple[str, ...] = ("base", "sft", "aligned"),
    prompt: str = "What is 2+2?",
    turn: int | None = None,
    max_tokens: int = 100,
    seed: int | None = None,
) -> SequenceView:
    """What a policy sees: the segments so far, the turn (default: one per segment)."""
    return SequenceView(
        request_id="r",
        prompt=prompt,
        models=models,
        segments=segments,
        turn=len(segments) if turn is None else turn,
        tokens_written=sum(len(s.token_ids) for s in segments),
        max_tokens=max_tokens,
        seed=seed,
    )


def char_trim(seg: Segment, n_chars: int) -> Segment:
    """The commit rules' `Trim` for one-token-per-character segments."""
    return replace(
        seg,
        token_ids=seg.token_ids[:n_chars],
        text=seg.text[:n_chars],
        logprobs=seg.logprobs[:n_chars],
    )


def make_request(**kw) -> GenerationRequest:
    """A request over models a and b (override any field)."""
    fields = dict(prompt="Once upon a time, ", models=("a", "b"), max_tokens=20)
    fields.update(kw)
    return GenerationRequest(**fields)
