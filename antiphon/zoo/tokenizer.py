"""Tokenizers the project builds itself, saved in HF format and loaded back with AutoTokenizer.

`build_char_tokenizer` makes a character-level tokenizer: one id per character of a fixed
alphabet plus special tokens. Character level keeps the zoo's models tiny and makes segment
boundaries between models exact (no merges across a boundary).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DEFAULT_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, extra_special_tokens: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer: ids 0..3 are <pad> <bos> <eos> <unk>, then the
    extra special tokens, then one id per distinct character of `alphabet` in order."""
    specials = list(SPECIAL_TOKENS) + list(extra_special_tokens)
    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split into single characters, keeping spaces and newlines as tokens of their own.
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


# The zoo's chat format: "Q: {user}\nA: {assistant}<eos>", generation prompt "A:". Rendering
# chat messages with it gives exactly the Q/A prompts the tuned checkpoints were trained on, so
# the OpenAI chat endpoint works on them.
QA_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'Q: ' + m['content'] + '\n' }}"
    "{%- else -%}{{ 'A: ' + m['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'A:' }}{%- endif -%}"
)

# Multi-character tokens of the alternative tokenizer: frequent words of the zoo's text.
ALT_MERGED_WORDS = (
    "the",
    "The",
    "capital",
    "colour",
    "founded",
    "was",
    "and",
    "Once",
    "upon",
    "time",
    "answer",
    "is",
    "of",
    "by",
    "It",
    "it",
    "Review",
    "What",
)


def build_alt_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer different from the family's: another id order (reversed alphabet, specials
    last) and whole-word tokens for frequent words, so ids and boundaries do not line up with
    `build_char_tokenizer`'s. For the cross-tokenizer paths."""
    chars = list(dict.fromkeys(DEFAULT_ALPHABET))[::-1]
    vocab: dict[str, int] = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    for word in ALT_MERGED_WORDS:
        # BPE merges building the word left to right: ("T","h"), ("Th","e"), ...
        for i in range(1, len(word)):
            left, right = word[:i], word[i]
            merged = left + right
            if merged not in vocab:
                merges.append((left, right))
                vocab[merged] = len(vocab)
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    # Words and single non-word characters are units; BPE merges apply inside a word only.
    core.pre_tokenizer = pre_tokenizers.Split(
        pattern=Regex(r"[A-Za-z]+|[^A-Za-z]"), behavior="isolated"
    )
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QA_CHAT_TEMPLATE
    return tok
