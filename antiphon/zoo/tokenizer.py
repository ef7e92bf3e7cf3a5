"""Tokenizers the project builds itself, saved in HF format and loaded back with AutoTokenizer.

`build_char_tokenizer` makes a character-level tokenizer: one id per character of a fixed
alphabet plus special tokens. Character level keeps the zoo's models tiny and makes segment
boundaries between models exact (no merges across a boundary).
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
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
