"""The zoo: a tiny model family with complementary skills, trained by `antiphon.zoo.build`
and shipped in the package under `antiphon/zoo/checkpoints/NAME/` (HF format).

    from antiphon.zoo import path, NAMES
    model_dir = path("aligned")   # a Path to load with AutoModelForCausalLM / ModelSpec(path=...)

Where the checkpoints lie and what they are called is `antiphon.checkpoint`'s (it resolves
`zoo:NAME` for every loader); this package builds them and holds their tasks.
"""

from antiphon.checkpoint import ZOO_DIR as CHECKPOINT_DIR
from antiphon.checkpoint import ZOO_NAMES as NAMES
from antiphon.checkpoint import zoo_path as path

__all__ = ["CHECKPOINT_DIR", "NAMES", "path"]
