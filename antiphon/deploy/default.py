"""The default config: the zoo's ensemble (`default.yaml`) when the zoo's checkpoints are
there, else a pair of tiny random-weight checkpoints written once to a cache directory.

    from antiphon.deploy.default import default_config
    config = default_config()        # what `antiphon serve` and `antiphon demo` deploy
"""

from __future__ import annotations

import os
from pathlib import Path

from antiphon.deploy.config import AppConfig, load_config, parse_config
from antiphon.errors import AntiphonError

DEFAULT_YAML = Path(__file__).with_name("default.yaml")
ZOO_MODELS = ("base", "sft", "aligned", "expert", "switcher")  # what default.yaml names


def cache_dir() -> Path:
    """Where generated checkpoints are kept: $XDG_CACHE_HOME/antiphon or ~/.cache/antiphon."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "antiphon"


def zoo_available() -> bool:
    """True if every checkpoint default.yaml names is in the zoo (the switcher included)."""
    try:
        from antiphon import zoo

        return all(Path(zoo.path(name), "config.json").exists() for name in ZOO_MODELS)
    except (ImportError, AttributeError, AntiphonError, OSError):
        return False


def write_random_model(out_dir: Path, seed: int) -> Path:
    """A tiny random-weight checkpoint in HF format, written once and reused."""
    if (out_dir / "config.json").exists():
        return out_dir
    from antiphon.zoo.random_model import write_random_checkpoint

    return write_random_checkpoint(out_dir, seed=seed)


def random_pair_config(root: Path | None = None) -> AppConfig:
    """Two random-weight checkpoints ('alpha', 'beta') taking turns; the stand-in ensemble."""
    root = root or cache_dir() / "random-pair"
    paths = {
        name: write_random_model(root / name, seed) for seed, name in enumerate(("alpha", "beta"))
    }
    return parse_config(
        {
            "models": [{"name": name, "path": str(p)} for name, p in paths.items()],
            "ensembles": [
                {
                    "name": "default",
                    "models": list(paths),
                    "description": "Two random-weight checkpoints (the zoo is not built).",
                    "policy": {"name": "round_robin", "params": {"segment_len": 8}},
                }
            ],
            "serving": {"default_max_tokens": 64, "turn_log_path": "runs/turns.atl"},
        },
        source="random pair",
    )


def default_config() -> AppConfig:
    """The zoo ensemble if the zoo is built, else the random pair."""
    return load_config(DEFAULT_YAML) if zoo_available() else random_pair_config()
