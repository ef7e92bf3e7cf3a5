"""Factories for tests: tiny random-weight checkpoints written the way real ones are.

`make_tiny_model` builds a Llama-architecture model from a config, saves it with
`save_pretrained` (safetensors) next to a character tokenizer, and returns the directory; the
code under test then loads it through the ordinary loader, exactly as a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from antiphon.zoo.tokenizer import DEFAULT_ALPHABET, build_char_tokenizer


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
    out = Path(out_dir)
    tokenizer = build_char_tokenizer(alphabet)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_context,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; widen them so greedy choices are not near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
