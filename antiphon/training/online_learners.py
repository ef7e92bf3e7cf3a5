"""What an online trainer learns, behind one small interface: the switcher, or a base model's
deferral gate. The trainer (`online_trainer`) does the rest the same for both: it tails the
log, keeps its state, judges each candidate and publishes it.

    learner.examples_from_json(d)        -> an example saved in the trainer's state
    learner.initial(init, scratch)       -> a directory to store as the first served version
    learner.train(examples, base, out, step)  # a candidate from version `base`, into `out`

- `SwitchLearner` fine-tunes the served switcher on reward-filtered decisions
  (`online_examples.request_examples`), as offline switcher training does.
- `GateLearner` fits the served gate to the marginal likelihood of logged responses that
  earned a good outcome (`online_examples.sequence_examples`): the base's head inputs and
  log-probs come from the base model in this process, the assistant's log-probs from
  `assistant`, any SessionModel: the live deployment when the trainer serves an app.
  A version is a directory holding one gate.safetensors; serve it with the base's
  `gate_path: <store>/served/gate.safetensors`, and each engine reads a promoted gate at its
  next call (`antiphon.actors.gate.GateSource`).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from antiphon.actors.gate import GATE_FILENAME, load_gate, save_gate
from antiphon.checkpoint import load_checkpoint, resolve_checkpoint_path, tokenizer_fingerprint
from antiphon.config import ModelSpec
from antiphon.errors import InvalidRequest, NotFound
from antiphon.training.gate_data import GateData, GoldText, build_gate_data
from antiphon.training.gate_training import GateFit, fit_marginal
from antiphon.training.online_examples import SequenceExample
from antiphon.training.rollouts import RolloutExample
from antiphon.training.switcher_training import SwitcherTrainConfig, train_switcher


class Learner(Protocol):
    """One learned policy's part of online training (see the module docstring)."""

    def examples_from_json(self, data: Mapping[str, object]) -> Any: ...

    def initial(self, init: str, scratch: Path) -> Path: ...

    def train(self, examples: Sequence[Any], base: Path, out: Path, step: int) -> None: ...


class SwitchLearner:
    """The switcher: fine-tuned on the new examples and the replayed ones."""

    def __init__(self, train: Mapping[str, object]) -> None:
        self.train_fields = dict(train)  # SwitcherTrainConfig fields (epochs, lr, lora_r...)
        SwitcherTrainConfig(**self.train_fields)  # a bad field fails here, not at step 1

    def examples_from_json(self, data: Mapping[str, object]) -> RolloutExample:
        return RolloutExample.from_json(data)

    def initial(self, init: str, scratch: Path) -> Path:
        return Path(resolve_checkpoint_path(init))

    def train(self, examples: Sequence[RolloutExample], base: Path, out: Path, step: int) -> None:
        # every example trains (the dev slice judges); the step's own seed, so a candidate
        # made again after a kill is the same candidate
        config = SwitcherTrainConfig(**{"val_fraction": 0.0, **self.train_fields, "seed": step})
        train_switcher(examples, str(base), out, config, progress=False)


class GateTrainConfig(BaseModel):
    """How the gate learner fits a candidate (`train:` of a gate trainer's config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=200, ge=1, description="Full-batch Adam steps per candidate.")
    lr: float = Field(default=0.02, gt=0)


class GateLearner:
    """A base model's deferral gate (see the module docstring). `assistant` answers open,
    teacher_force and close: an engine, or the client of a model deployment."""

    def __init__(
        self, base: ModelSpec, assistant: Any, train: Mapping[str, object] | None = None
    ) -> None:
        self.config = GateTrainConfig(**(train or {}))
        self.model, self.tokenizer = load_checkpoint(base)
        self.hidden_size = self.model.config.get_text_config().hidden_size
        self.assistant = assistant
        self.checked = False  # the assistant's tokenizer, checked at the first candidate

    def examples_from_json(self, data: Mapping[str, object]) -> SequenceExample:
        return SequenceExample.from_json(data)

    def initial(self, init: str, scratch: Path) -> Path:
        """A directory holding only the gate of `init` (a gate file, or a directory with
        one: `antiphon train gate` writes its training data beside it)."""
        source = Path(init)
        if source.is_dir():
            source = source / GATE_FILENAME
        if not source.is_file():
            raise NotFound(f"init: no gate file at {source}")
        load_gate(source, self.hidden_size)  # a gate for another model fails here
        out = scratch / "initial-gate"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / GATE_FILENAME)
        return out

    def train(self, examples: Sequence[SequenceExample], base: Path, out: Path, step: int) -> None:
        data = asyncio.run(self.features(examples, step))
        served = load_gate(base / GATE_FILENAME, self.hidden_size)
        fit = fit_marginal(data, init=GateFit(served.weight, served.bias),
                           steps=self.config.steps, lr=self.config.lr)  # fmt: skip
        save_gate(out / GATE_FILENAME, fit.weight, fit.bias)

    def gold_text(self, example: SequenceExample) -> GoldText:
        """The logged response as gold text: the prompt as a session opens it, then the
        response's tokens (one tokenizer: the base's and the assistant's)."""
        prompt = self.tokenizer(example.prompt)["input_ids"]
        return GoldText(example.key, tuple(prompt), tuple(example.token_ids))

    async def features(self, examples: Sequence[SequenceExample], step: int) -> GateData:
        """Both models over the examples' tokens (the assistant through its engine)."""
        await self._check_tokenizer()
        texts = [self.gold_text(e) for e in examples]
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        return await build_gate_data(self.model, pad, self.assistant, texts, {"step": step})

    async def _check_tokenizer(self) -> None:
        if self.checked:
            return
        info = await self.assistant.info()
        mine = tokenizer_fingerprint(self.tokenizer)
        if info.tokenizer_fingerprint != mine:
            raise InvalidRequest(
                f"the gate learner needs one tokenizer: the assistant {info.name!r} reads "
                f"tokens another way than the base (a marginal likelihood mixes their log-probs "
                f"of the same tokens)"
            )
        self.checked = True


__all__ = ["GateLearner", "GateTrainConfig", "Learner", "SwitchLearner"]
