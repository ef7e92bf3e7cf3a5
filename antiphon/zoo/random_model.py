"""Random-weight checkpoints of the zoo's architecture, written the way trained ones are.

`write_random_checkpoint` builds a Llama model from a config, saves it with `save_pretrained`
(safetensors) beside a character tokenizer, and returns the directory; whatever loads it then
goes through the ordinary loader, as with a hub checkpoint. The stand-in ensemble (before the
zoo is built) and the tests use it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from antiphon.zoo.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from antiphon.zoo.train import ModelShape

# Random init gives near-uniform logits; widening the output layer makes greedy choices
# clear-cut, so comparisons of two greedy paths are not decided by float noise.
LOGIT_SCALE = 8.0
TINY_SHAPE = ModelShape(hidden=64, layers=2, heads=4, context=512)


def write_random_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    shape: ModelShape = TINY_SHAPE,
    alphabet: str = DEFAULT_ALPHABET,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Write a random-weight causal LM + tokenizer to out_dir (HF format) and return it.

    The files appear at once: they are written to a sibling directory and renamed, so a crash
    mid-write leaves no half checkpoint behind. `tokenizer`: another tokenizer than the
    character one of `alphabet`."""
    out = Path(out_dir)
    tokenizer = tokenizer if tokenizer is not None else build_char_tokenizer(alphabet)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(shape.config(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
