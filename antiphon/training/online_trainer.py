"""The online trainer of one learned policy (the switcher, or a base model's deferral gate:
`online_learners`): it tails the turn log, turns rewarded requests into examples
(`online_examples`), and every `examples_per_candidate` new examples trains a candidate
from the served version, has it judged on a dev slice against the served one (the
promotion gate of `policy_versions`) and, if it is at least as good, publishes it.

Exactly once: the trainer's state (its log offset, the joiner's requests awaiting their
reward, the examples not yet trained on, the replay buffer, the step) is one JSON file
replaced atomically. Every candidate's provenance names the log range its new examples
came from. A trainer killed at any point resumes from the last state: the records after its
offset are read again and the candidate it was making is made again, so no turn is skipped
or counted twice. Once a state is on disk, the trainer tells the log (a consumer offset)
that everything before its offset may be rotated away.

    trainer = OnlineTrainer(config, SwitchLearner(config.train), evaluate=dev_scores,
                            publish=serve_version)
    while True:
        trainer.poll()          # reads what is new; trains, judges, publishes when due
        time.sleep(config.poll_s)

`evaluate(checkpoint_path) -> per-item dev scores` and `publish(version_info)` are the
trainer's only contact with serving, so it runs the same in a test, a Ray actor or a job.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from antiphon import metrics
from antiphon.errors import InvalidRequest
from antiphon.logging import get_logger
from antiphon.policies.actor import POLICY_NAMESPACE
from antiphon.training.durable import write_json_atomic
from antiphon.training.online_examples import LoggedRequest, LogJoiner
from antiphon.training.online_learners import Learner
from antiphon.training.policy_versions import PolicyStore, VersionInfo, promotion_decision
from antiphon.training.rollouts import RolloutExample, RolloutStore
from antiphon.training.switcher_training import example_hits
from antiphon.training.turn_log import commit_consumer_offset, read_records

log = get_logger(__name__)

STATE_FILE = "trainer_state.json"

Evaluate = Callable[[str], Sequence[float]]  # version directory -> per-item dev scores
Publish = Callable[[VersionInfo], None]
# a rewarded request -> examples labelled by fresh rollouts from its prefixes
Rollouts = Callable[[LoggedRequest], Sequence[RolloutExample]]


class DevSlice(BaseModel):
    """Where candidates are judged against the served version: labelled examples (a rollout
    store's examples.jsonl, judged offline; switchers only), or the zoo's dev tasks asked
    through a running app (`antiphon.experiments.train_online` builds that judge). Never the
    test split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    examples: str | None = Field(default=None, description="A rollout store directory.")
    app: str | None = Field(default=None, description="The Serve app of a running server.")
    models: list[str] = Field(default_factory=list, description="The ensemble (app only).")
    policy_params: dict[str, object] = Field(
        default_factory=dict,
        description="The policy's parameters as the ensemble's, but the switcher's checkpoint "
        "(app only).",
    )
    tasks: list[str] = Field(default_factory=list, description="Zoo tasks (app only; all).")
    limit: int | None = Field(default=20, ge=1, description="Items per task (app only).")
    seed: int = 0

    @model_validator(mode="after")
    def _one_judge(self) -> DevSlice:
        if (self.examples is None) == (self.app is None):
            raise ValueError("dev: give exactly one of examples (a rollout store) or app")
        if self.app is not None and not self.models:
            raise ValueError("dev: an app judge needs the ensemble's models")
        return self


class OnlineRollouts(BaseModel):
    """Rollouts from logged prefixes (`antiphon.training.online_rollouts`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: int = Field(default=2, ge=1, description="Completions per candidate writer.")
    segment_len: int = Field(default=16, ge=1, description="Tokens per branch segment.")
    prefixes_per_request: int = Field(default=2, ge=1, description="Segment boundaries.")
    tasks: list[str] = Field(
        default_factory=list, description="Zoo tasks whose dev prompts are verified (all)."
    )
    seed: int = 0


class OnlineTrainConfig(BaseModel):
    """What `antiphon train online --config FILE` reads (YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    turn_log: str = Field(description="The turn log the serving coordinators write.")
    store: str = Field(description="The policy store: every version, and which one is served.")
    state_dir: str = Field(description="The trainer's own state (offset, buffers).")
    learner: Literal["switch", "gate"] = Field(
        default="switch", description="What it learns: the switcher, or a deferral gate."
    )
    init: str = Field(
        description="The version served first: a switcher (an HF dir or zoo:NAME), or a gate "
        "(its file, or a directory holding gate.safetensors)."
    )
    base_checkpoint: str | None = Field(
        default=None,
        description="The checkpoint that carries the gate (learner gate): its head inputs and "
        "log-probs are computed in the trainer's process.",
    )
    consumer: str = Field(
        default="switch-trainer", description="Its name as a consumer of the log."
    )
    policies: list[str] = Field(
        default=["switch"],
        min_length=1,
        description="Whose requests it learns from: the served policy's (switch, defer), and "
        "any behaviour policy's that explores for it (e.g. fixed, one writer alone).",
    )
    invert_rewards: bool = Field(
        default=False,
        description="Learn from 1 - reward: a deliberately bad trainer, to see the gate refuse "
        "its candidates.",
    )
    examples_per_candidate: int = Field(default=64, ge=1)
    replay: int = Field(
        default=512, ge=0, description="Earlier examples trained on again with the new ones."
    )
    poll_s: float = Field(default=5.0, gt=0)
    dev: DevSlice
    rollouts: OnlineRollouts | None = Field(
        default=None,
        description="Also label each rewarded switch request by fresh rollouts from its "
        "logged prefixes on the app's deployments (dev.app), scored by the zoo task's "
        "verifier of its prompt.",
    )
    publish_to: str | None = Field(
        default=None,
        description="The policy actor serving the switcher (by name): reloaded at each "
        "promotion or rollback. Its switcher_path must be the store's served link.",
    )
    train: dict[str, object] = Field(
        default_factory=dict,
        description="SwitcherTrainConfig fields (epochs, lr, lora_r...), or GateTrainConfig's.",
    )

    @model_validator(mode="after")
    def _gate_needs_its_model(self) -> OnlineTrainConfig:
        if self.learner == "gate":
            if self.base_checkpoint is None:
                raise ValueError("learner gate: give base_checkpoint, the model carrying it")
            if self.dev.app is None:
                raise ValueError("learner gate: judge through an app (dev.app), whose "
                                 "deployment also scores the assistant's log-probs")  # fmt: skip
            if self.rollouts is not None:
                raise ValueError("rollouts label switch decisions: not for learner gate")
        if self.rollouts is not None and self.dev.app is None:
            raise ValueError("rollouts run on the app's deployments: give dev.app")
        return self


@dataclass
class TrainerState:
    """Everything the trainer needs to go on exactly where it stopped."""

    offset: int = 0  # in the turn log: every record before it is accounted for
    step: int = 0  # candidates made
    candidate_start: int = 0  # where the log range of the pending examples starts
    base: str = ""  # the version the next candidate is trained from
    published: str = ""  # the version last published to serving
    joiner: dict = field(default_factory=dict)
    pending: list[dict] = field(default_factory=list)  # examples not yet trained on
    replay: list[dict] = field(default_factory=list)  # examples trained on, newest last
    dev_scores: dict[str, list[float]] = field(default_factory=dict)  # the served version's

    def save(self, state_dir: Path) -> None:
        """Replace the state file atomically (a crash leaves the old one or the new one)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_dir / STATE_FILE, asdict(self))

    @classmethod
    def load(cls, state_dir: Path) -> TrainerState | None:
        path = state_dir / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


@dataclass(frozen=True)
class CandidateOutcome:
    """One candidate, judged: promoted (and published) or kept on disk unserved."""

    version: VersionInfo
    promoted: bool
    reason: str


class OnlineTrainer:
    """Learns a policy from the turn log; see the module docstring."""

    def __init__(
        self,
        config: OnlineTrainConfig,
        learner: Learner,
        evaluate: Evaluate,
        publish: Publish = lambda version: None,
        rollouts: Rollouts | None = None,
    ) -> None:
        self.config = config
        self.learner = learner
        self.rollouts = rollouts  # more examples from each rewarded request (switcher only)
        self.evaluate = evaluate
        self.publish = publish
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = PolicyStore(config.store)
        self.state = TrainerState.load(self.state_dir) or TrainerState()
        self.joiner = (
            LogJoiner.from_state(self.state.joiner)
            if self.state.joiner
            else LogJoiner(
                tuple(config.policies), invert=config.invert_rewards, learner=config.learner
            )  # fmt: skip
        )
        if self.store.served() is None:
            self._serve_initial()

    @property
    def name(self) -> str:
        return self.config.consumer

    def served(self) -> VersionInfo:
        served = self.store.served()
        assert served is not None  # the initial version is served from the start
        metrics.record(metrics.SERVED_POLICY_STEP, served.step, trainer=self.name)
        return served

    def _redoing(self) -> bool:
        """Whether this trainer died making its next candidate before saving its state: the
        candidate is in the store already, and must be made again from the same base to come
        out the same."""
        state = self.state
        return bool(state.base) and any(
            v.step == state.step + 1 and v.provenance.get("trainer") == self.name
            and v.provenance.get("log_offsets", [None])[0] == state.candidate_start
            for v in self.store.versions()
        )  # fmt: skip

    def _serve_initial(self) -> None:
        with tempfile.TemporaryDirectory(dir=self.state_dir) as scratch:
            first = self.store.add_candidate(
                self.learner.initial(self.config.init, Path(scratch)), step=0,
                provenance={"trainer": self.name, "log_offsets": [0, 0], "examples": 0},
            )  # fmt: skip
        self.store.promote(first.version, reason="the initial version")
        self._publish(self.served())

    def _publish(self, version: VersionInfo) -> None:
        self.publish(version)
        self.state.published = version.version

    def poll(self, max_candidates: int | None = None) -> list[CandidateOutcome]:
        """Publish the served version if it is not the one last published (`antiphon policy
        rollback` moved it); read the log past the state's offset; make and judge a candidate
        each time enough new examples have come (stop reading after `max_candidates` of
        them); save the state. Returns the candidates judged."""
        outcomes: list[CandidateOutcome] = []
        served = self.served()
        if served.version != self.state.published:  # an operator rolled back (or forward)
            self._publish(served)
        if not self._redoing():  # train from what is served now
            self.state.base = served.version
        for record, offset in read_records(self.config.turn_log, self.state.offset):
            examples = [e for e in self.joiner.add(record) if e.informative]
            if self.rollouts is not None and self.joiner.rewarded_now is not None:
                examples += [e for e in self.rollouts(self.joiner.rewarded_now) if e.informative]
            self.state.pending += [asdict(e) for e in examples]
            if examples:
                metrics.record(metrics.TRAINER_EXAMPLES, len(examples), trainer=self.name)
            self.state.offset = offset
            if len(self.state.pending) >= self.config.examples_per_candidate:
                outcomes.append(self._candidate())
                self._save()
                if max_candidates is not None and len(outcomes) >= max_candidates:
                    break
        self._save()
        return outcomes

    def train_pending(self) -> CandidateOutcome | None:
        """Make and judge a candidate from the pending examples now, however few (the end of
        a round of traffic); None when there are none."""
        if not self.state.pending:
            return None
        outcome = self._candidate()
        self._save()
        return outcome

    def _save(self) -> None:
        self.state.joiner = self.joiner.state()
        self.state.save(self.state_dir)
        metrics.record(metrics.TRAINER_LOG_OFFSET, self.state.offset, trainer=self.name)
        # only now may the log drop what came before: the state no longer needs it
        commit_consumer_offset(self.config.turn_log, self.name, self.state.offset)

    def _candidate(self) -> CandidateOutcome:
        """Train a candidate on the pending examples (and the replay buffer) from the served
        version, add it to the store, judge it, promote or refuse it."""
        state, base = self.state, self.store.info(self.state.base)
        state.step += 1
        fresh = [self.learner.examples_from_json(e) for e in state.pending]
        replay = [self.learner.examples_from_json(e) for e in state.replay]
        with tempfile.TemporaryDirectory(dir=self.state_dir) as out:
            self.learner.train(replay + fresh, Path(base.path), Path(out), state.step)
            candidate = self.store.add_candidate(
                out, step=state.step,
                provenance={"trainer": self.name, "parent": base.version,
                            "log_offsets": [state.candidate_start, state.offset],
                            "examples": len(fresh), "replayed": len(replay),
                            "requests": self.joiner.counters.rewarded},
            )  # fmt: skip
        outcome = self._judge(candidate)
        state.base = self.served().version
        # only the served version's scores are judged against again (the state stays small)
        state.dev_scores = {v: s for v, s in state.dev_scores.items() if v == state.base}
        keep = self.config.replay
        state.replay = (state.replay + state.pending)[-keep:] if keep else []
        state.pending, state.candidate_start = [], state.offset
        return outcome

    def _scores(self, version: VersionInfo) -> list[float]:
        if version.version not in self.state.dev_scores:
            self.state.dev_scores[version.version] = list(self.evaluate(str(version.path)))
        return self.state.dev_scores[version.version]

    def _judge(self, candidate: VersionInfo) -> CandidateOutcome:
        """Promote (and publish) `candidate` if it scores at least the served version on the
        dev slice, else refuse it; one judged before a kill keeps its verdict."""
        if candidate.status != "candidate":
            if candidate.status == "promoted":
                self._publish(candidate)
            return CandidateOutcome(candidate, candidate.status == "promoted", candidate.reason)
        decision = promotion_decision(self._scores(candidate), self._scores(self.served()))
        self.store.record_evaluation(candidate.version, decision.candidate)
        if decision.promote:
            self.store.promote(candidate.version, reason=decision.reason)
            self._publish(self.served())
        else:
            self.store.refuse(candidate.version, reason=decision.reason)
        log.info("candidate judged", version=candidate.version, promoted=decision.promote,
                 reason=decision.reason, step=self.state.step)  # fmt: skip
        outcome = "promoted" if decision.promote else "refused"
        metrics.record(metrics.TRAINER_CANDIDATES, 1, trainer=self.name, outcome=outcome)
        return CandidateOutcome(self.store.info(candidate.version), decision.promote,
                                decision.reason)  # fmt: skip


def examples_judge(store_dir: str | Path) -> Evaluate:
    """Dev scores from labelled examples: per example, whether the switcher ranks one of its
    best models first."""
    examples = [e for e in RolloutStore(store_dir).examples() if e.informative]
    if not examples:
        raise InvalidRequest(f"dev: no labelled example in the rollout store {store_dir}")
    return lambda checkpoint: example_hits(checkpoint, examples)


def actor_publisher(name: str, namespace: str = POLICY_NAMESPACE) -> Publish:
    """Tell the named policy actor to reload (its switcher path is the store's served link)."""

    def publish(version: VersionInfo) -> None:
        import ray

        got = ray.get(ray.get_actor(name, namespace=namespace).reload.remote())
        log.info("published", version=version.version, served_version=got)

    return publish


def run_online(trainer: OnlineTrainer, until_idle: bool = False) -> None:
    """Poll the log every `poll_s` seconds, for ever, or with `until_idle` until a poll finds
    nothing new (a batch run over a log that is not being written)."""
    while True:
        before = trainer.state.offset
        trainer.poll()
        if until_idle and trainer.state.offset == before:
            return
        time.sleep(0 if until_idle else trainer.config.poll_s)


__all__ = [
    "CandidateOutcome",
    "DevSlice",
    "OnlineTrainer",
    "OnlineRollouts",
    "OnlineTrainConfig",
    "TrainerState",
    "actor_publisher",
    "examples_judge",
    "run_online",
]
