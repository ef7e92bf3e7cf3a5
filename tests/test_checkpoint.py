"""Loading checkpoints: safetensors only (a pickled checkpoint is refused, not unpickled), and
a checkpoint's own code runs only when its config asks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from antiphon.checkpoint import load_checkpoint
from antiphon.config import ModelSpec
from antiphon.errors import NotFound


def test_a_pickled_checkpoint_is_refused_not_unpickled(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    weights = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")  # the same weights, as a pickle
    with pytest.raises(NotFound, match="model 'p': no loadable checkpoint"):
        load_checkpoint(ModelSpec(name="p", path=str(pickled)))


def test_code_shipped_with_a_checkpoint_does_not_run_unless_the_config_asks(
    tiny_model_dir, tmp_path
):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, remote)
    marker = tmp_path / "ran"
    (remote / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"  # code to import
    )
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (remote / "config.json").write_text(json.dumps(config))
    spec = ModelSpec(name="r", path=str(remote))
    assert spec.trust_remote_code is False
    load_checkpoint(spec)  # loads as the architecture it names, without the shipped code
    assert not marker.exists()
    trusted = spec.model_copy(update={"trust_remote_code": True})
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        load_checkpoint(trusted)  # the shipped config names no model class: loading stops
    assert marker.exists()  # asked for, the shipped code did run: the check above can fail
