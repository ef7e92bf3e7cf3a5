"""Structured output through llguidance (the grammar library vLLM and SGLang use): an API's
`response_format` as a grammar, and a matcher per generate call that says which tokens of a
model's vocabulary keep the response inside it.

    grammar = response_format_grammar("json_schema", schema)
    matcher = GrammarTokenizer(hf_tokenizer, vocab_size).matcher(grammar, response_ids)
    allowed = matcher.allowed()        # (V,) bool: the tokens the grammar takes next
    matcher.accept(token)

The grammar is over bytes, so it holds whoever wrote the text: each writer's matcher is fed
the response so far in its own tokens (another model's text re-tokenized) before it writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from antiphon.errors import InvalidRequest


def response_format_grammar(kind: str, schema: Mapping[str, object] | None = None) -> str | None:
    """The llguidance grammar of an OpenAI `response_format` of this type (None for plain
    text), compact JSON (no whitespace: a small model would pad it without end);
    InvalidRequest naming what is wrong with the schema."""
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    elif kind != "json_schema" or schema is None:
        raise InvalidRequest(
            f"response_format: type {kind!r} with schema {schema!r}; 'text', 'json_object', "
            "or 'json_schema' with a schema"
        )
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
    except ValueError as e:
        raise InvalidRequest(f"response_format: {e}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem:
        raise InvalidRequest(f"response_format: the schema is not supported: {problem}")
    return grammar


class GrammarTokenizer:
    """A model's vocabulary as llguidance sees it (built once per model, on first use)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        try:  # a real HF fast tokenizer: llguidance reads its byte-level vocabulary itself
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        except ValueError:  # a decoder it does not know (the zoo's): each token's own text
            self.tokenizer = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(_DecodedTokens(tokenizer, vocab_size)),
                n_vocab=vocab_size,
            )

    def matcher(self, grammar: str, response_ids: Sequence[int]) -> GrammarMatcher:
        """A matcher that has read the response so far (InvalidRequest if it breaks the
        grammar, which only a text not written under it does)."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"grammar: {matcher.get_error()}")
        if response_ids and not matcher.consume_tokens(list(response_ids)):
            raise InvalidRequest(
                f"grammar: the response so far does not match it: {matcher.get_error()}"
            )
        return GrammarMatcher(matcher, self.vocab_size, self.tokenizer.eos_tokens)


class GrammarMatcher:
    """One generate call's place in the grammar."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: Sequence[int]
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = list(eos_ids)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the text inside the grammar (only end-of-sequence
        once it is complete). Where no token of this vocabulary can go on (a pattern of
        characters it lacks), the end: the writer stops, as at its budget, and nothing is
        sampled from an empty distribution."""
        bias = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8)
        allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
        n = min(self.vocab_size, bias.numel())
        allowed[:n] = bias[:n] > 0
        if not allowed.any():
            allowed[self.eos_ids] = True
        return allowed

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)


class _DecodedTokens:
    """What llguidance's `TokenizerWrapper` reads of a tokenizer: each id's bytes (its
    decoded text; special tokens none), the special ids, and an encoder."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
        special = set(tokenizer.all_special_ids)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.special_token_ids = sorted(special)
        self.tokens = [
            b"" if i in special or i >= len(tokenizer) else tokenizer.decode([i]).encode()
            for i in range(vocab_size)
        ]
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
