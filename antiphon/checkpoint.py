"""Checkpoints: where one is (a local HF directory, a hub id, or `zoo:NAME` for a checkpoint
the package ships) and loading it. The one place a model or a tokenizer is read from disk.

    model, tokenizer = load_checkpoint(ModelSpec(name="base", path="zoo:base"))
    tokenizer = load_tokenizer("zoo:sft")
    facts = checkpoint_facts(model, tokenizer)     # context, end tokens, tokenizer fingerprint
    context = checkpoint_context("zoo:strong")     # from its config alone, no weights

Loading is exactly what loads a real 8B checkpoint: `AutoModelForCausalLM` and
`AutoTokenizer`, safetensors only, no code shipped with the checkpoint unless the spec asks;
a PEFT adapter directory (e.g. a switcher's LoRA) loads over the base it names.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoTokenizer

from antiphon.config import ModelSpec
from antiphon.errors import NotFound

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The zoo: the project's own tiny model family, shipped under antiphon/zoo/checkpoints/NAME/.
# base: pretrained; sft, aligned: tuned from base (aligned = sft + DPO); strong: larger
# pretrained; guide-untuned / guide-tuned: small pair, tuned prefers positive sentiment;
# expert: base tuned on arithmetic; alt-tok: small pretrained model with another tokenizer.
ZOO_DIR = Path(__file__).parent / "zoo" / "checkpoints"
ZOO_NAMES: tuple[str, ...] = (
    "base",
    "sft",
    "aligned",
    "strong",
    "guide-tuned",
    "guide-untuned",
    "expert",
    "alt-tok",
)
# Trained from the zoo by the experiments and shipped beside it (`python -m
# antiphon.experiments.switch --ship`): the switcher of the switch ensemble.
ZOO_TRAINED: tuple[str, ...] = ("switcher",)
ZOO_SCHEME = "zoo:"
ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a PEFT adapter


def zoo_path(name: str) -> Path:
    """Directory of the shipped zoo checkpoint `name`; NotFound lists the names if unknown."""
    if name not in ZOO_NAMES + ZOO_TRAINED:
        known = ", ".join(ZOO_NAMES + ZOO_TRAINED)
        raise NotFound(f"no zoo checkpoint named {name!r}; known: {known}")
    found = ZOO_DIR / name
    if not (found / "config.json").exists():
        raise NotFound(
            f"zoo checkpoint {name!r} is not installed at {found}; build it with "
            + (
                "`python -m antiphon.experiments.switch --ship`"
                if name in ZOO_TRAINED
                else "`antiphon zoo build` (python -m antiphon.zoo.build --install)"
            )
        )
    return found


def resolve_checkpoint_path(path: str) -> str:
    """A local directory or hub id as is; 'zoo:NAME' -> the zoo checkpoint's directory."""
    if path.startswith(ZOO_SCHEME):
        return str(zoo_path(path[len(ZOO_SCHEME) :]))
    return path


def tokenizer_source(where: str) -> str:
    """Where a checkpoint's tokenizer is: its own directory, or for a PEFT adapter directory
    that ships none (adapters often do not), the base model the adapter names."""
    adapter = Path(where, ADAPTER_CONFIG)
    if adapter.is_file() and not Path(where, "tokenizer_config.json").is_file():
        return json.loads(adapter.read_text())["base_model_name_or_path"]
    return where


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of the checkpoint at `path` (a directory, hub id or 'zoo:NAME')."""
    where = tokenizer_source(resolve_checkpoint_path(path))
    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise NotFound(f"no loadable tokenizer at {path!r} ({e})") from e


def load_checkpoint(spec: ModelSpec) -> tuple[PreTrainedModel, Any]:
    """Load spec's causal LM (safetensors only, eval mode, spec's device, dtype) and tokenizer.
    A PEFT adapter directory (`adapter_config.json`) loads as its base with the adapter on
    (transformers' PEFT integration), as the field's tools load one."""
    # imported here: the model classes cost ~4 s of import that processes which only read
    # tokenizers (the ingress, the coordinator) never need
    from transformers import AutoModelForCausalLM

    where = resolve_checkpoint_path(spec.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_source(where), trust_remote_code=spec.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            where,
            use_safetensors=True,
            trust_remote_code=spec.trust_remote_code,
            dtype=DTYPES[spec.dtype],
        )
    except OSError as e:
        raise NotFound(f"model {spec.name!r}: no loadable checkpoint at {spec.path!r} ({e})") from e
    model.to(torch.device(spec.device))
    model.eval()
    return model, tokenizer


def cache_argument(model: PreTrainedModel) -> str:
    """The name under which the model's forward takes (and its output returns) the KV cache:
    `cache` from transformers 5.24 (`past_key_values` is deprecated there, to be removed in
    5.40), `past_key_values` before. Asked once per loaded model, not per call."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and special tokens: equal -> ids mean the same text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = sorted(str(t) for t in tokenizer.all_special_tokens)
    blob = json.dumps([vocab, specials], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_fingerprint(path: str | Path) -> str:
    """A short id of a checkpoint's weights: name, size and first MiB of each safetensors file
    (a full hash of an 8B checkpoint would take minutes); "unknown" if there are none."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return "unknown"
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class CheckpointFacts:
    """What serving needs to know about a loaded checkpoint beyond its weights."""

    vocab_size: int  # rows of the input embedding (token ids must be below it)
    max_context: int  # positions the model reads
    eos_token_ids: tuple[int, ...]  # tokens that end a sequence, sorted
    tokenizer_fingerprint: str


def checkpoint_facts(model: PreTrainedModel, tokenizer: Any) -> CheckpointFacts:
    return CheckpointFacts(
        vocab_size=int(model.get_input_embeddings().num_embeddings),
        max_context=_max_context(model, tokenizer),
        eos_token_ids=_eos_ids(model, tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def checkpoint_context(path: str, trust_remote_code: bool = False) -> int | None:
    """The positions the checkpoint at `path` reads, from its config alone (no weights
    loaded); None when `path` holds no model config (a tokenizer alone)."""
    try:
        config = AutoConfig.from_pretrained(
            resolve_checkpoint_path(path), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError):
        return None
    return _config_context(config.get_text_config())


def _config_context(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _max_context(model: PreTrainedModel, tokenizer: Any) -> int:
    context = _config_context(model.config.get_text_config())
    if context is not None:
        return context
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    return 2048


def _eos_ids(model: PreTrainedModel, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(t) for t in source)
    return tuple(sorted(ids))
