"""The zoo: a tiny model family with complementary skills, trained by `antiphon.zoo.build`
and shipped in the package under `antiphon/zoo/checkpoints/NAME/` (HF format).

    from antiphon.zoo import path, NAMES
    model_dir = path("aligned")   # a Path to load with AutoModelForCausalLM / ModelSpec(path=...)
"""

from __future__ import annotations

from pathlib import Path

from antiphon.errors import NotFound

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"

# base: pretrained; sft, aligned: tuned from base (aligned = sft + DPO); strong: larger
# pretrained; guide-untuned / guide-tuned: small pair, tuned prefers positive sentiment;
# expert: base tuned on arithmetic; alt-tok: small pretrained model with another tokenizer.
NAMES: tuple[str, ...] = (
    "base",
    "sft",
    "aligned",
    "strong",
    "guide-tuned",
    "guide-untuned",
    "expert",
    "alt-tok",
)


def path(name: str) -> Path:
    """Directory of the shipped checkpoint `name`; NotFound lists the names if unknown."""
    if name not in NAMES:
        raise NotFound(f"no zoo checkpoint named {name!r}; known: {', '.join(NAMES)}")
    found = CHECKPOINT_DIR / name
    if not (found / "config.json").exists():
        raise NotFound(
            f"zoo checkpoint {name!r} is not installed at {found}; build it with "
            "`antiphon zoo build` (python -m antiphon.zoo.build --install)"
        )
    return found
