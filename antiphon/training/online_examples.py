"""From the turn log to training examples, for a trainer that learns from traffic: the
switcher's (`request_examples`) or the deferral gate's (`sequence_examples`).

A request's records land in the log in this order: its turn records, its request record (the
query and the outcome), then, whenever the client (or a verifier) sends it, a feedback record
with the reward. `LogJoiner` folds records in log order and hands out each request once, when
its first reward arrives; a second reward for the same request is counted, not used.

Each switch decision of a request rewarded above the baseline (the running mean of the
rewards before it) becomes one `RolloutExample` (the offline rollouts' format, so the same
trainer fits it): the prefix is the segments before the turn, and the writer the served
switcher chose is labelled best (its utility the reward, every other writer's the baseline).
A request at or below the baseline teaches nothing: its failure says the chosen writers did
no better than usual, not which other writer would have done better, and labelling "any
other" would push the switcher towards the models that fail everywhere. This is
reward-filtered imitation of the served policy's own decisions (as in rejection-sampling
fine-tuning); the served switch must explore (sample its writers) for it to find better ones.

For the gate, a request rewarded above the baseline gives one `SequenceExample`: its prompt
and its whole logged response (every segment's tokens, whoever wrote them). The gate trainer
maximises the marginal likelihood of those tokens, as Co-LLM does on gold text: the gate
learns to defer where the assistant explains a good response better than the base.

    joiner = LogJoiner(policies=("switch",))       # LogJoiner(("defer",), learner="gate")
    for record, offset in read_records(log_path, state.offset):
        for example in joiner.add(record):
            ...

The joiner's state (requests awaiting their reward, the baseline, the counters) is a plain
dict (`state()` / `LogJoiner.from_state`), checkpointed with the trainer's log offset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from antiphon.coordinator.records import FeedbackRecord, Record, RequestRecord, TurnRecord
from antiphon.training.rollouts import RolloutExample, example_key, label_from_utilities

# Requests whose reward has not come yet are held at most this many at a time; beyond it the
# oldest is given up (counted in `unrewarded`: the log still holds it)
MAX_AWAITING = 10_000
# The ids of requests already handed out are remembered this many at a time, newest kept, so
# the joiner's state stays bounded on a log that never ends; a second reward for a request
# older than that counts as unknown feedback, and is not used either
MAX_REMEMBERED = 100_000


@dataclass
class JoinCounters:
    """What the joiner has seen, for the trainer's provenance and metrics."""

    requests: int = 0  # request records of the policies learnt from
    rewarded: int = 0  # requests handed out with their reward
    examples: int = 0  # examples made (informative or not)
    failed: int = 0  # request records of failed requests (nothing to learn from)
    duplicate_feedback: int = 0  # a second reward for a request already used
    unknown_feedback: int = 0  # a reward for a request this joiner never saw
    unrewarded: int = 0  # requests given up waiting for their reward


@dataclass
class LoggedRequest:
    """A finished request of a policy learnt from, awaiting its reward."""

    request: RequestRecord
    turns: list[TurnRecord] = field(default_factory=list)


@dataclass
class SequenceExample:
    """A logged response that earned a good outcome: what the gate is trained on."""

    key: str  # the request id
    prompt: str
    token_ids: list[int]  # the response, every segment's tokens in order
    reward: float

    informative = True  # every kept response teaches the gate

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> SequenceExample:
        return cls(**d)


def sequence_examples(
    logged: LoggedRequest, reward: float, baseline: float
) -> list[SequenceExample]:
    """The request's prompt and response if `reward` is above `baseline`, else nothing."""
    if reward <= baseline:
        return []
    segments = sorted(logged.turns, key=lambda t: t.segment)
    tokens = [token for turn in segments for token in turn.token_ids]
    request = logged.request
    return [SequenceExample(request.request_id, request.prompt, tokens, reward)] if tokens else []


def request_examples(logged: LoggedRequest, reward: float, baseline: float) -> list[RolloutExample]:
    """One example per written segment of `logged` if `reward` is above `baseline`, else
    none (see the module docstring)."""
    if reward <= baseline:
        return []
    request, models = logged.request, list(logged.request.models)
    segments = sorted(logged.turns, key=lambda t: t.segment)
    examples, prefix = [], []
    for turn in segments:
        writer = models.index(turn.model)
        if turn.segment_kind == "write":
            utilities = [reward if i == writer else baseline for i in range(len(models))]
            best, label = label_from_utilities(utilities)
            examples.append(
                RolloutExample(
                    key=example_key(request.request_id, str(turn.segment)),
                    task=str(request.policy_params.get("task", "online")),
                    query=request.prompt,
                    models=models,
                    prefix=list(prefix),
                    utilities=utilities,
                    scores=[[u] for u in utilities],
                    best=best,
                    label=label,
                    prefix_tokens=sum(len(t.token_ids) for t in segments[: len(prefix)]),
                    total_tokens=sum(len(t.token_ids) for t in segments),
                )
            )
        prefix.append((writer, turn.text))
    return examples


EXAMPLES = {"switch": request_examples, "gate": sequence_examples}  # by learner


class LogJoiner:
    """Folds turn log records (in log order) into labelled examples of some policies' requests,
    for one learner (`EXAMPLES`)."""

    def __init__(
        self,
        policies: tuple[str, ...] = ("switch",),
        max_awaiting: int = MAX_AWAITING,
        invert: bool = False,
        learner: str = "switch",
        max_remembered: int = MAX_REMEMBERED,
    ) -> None:
        if learner not in EXAMPLES:
            raise ValueError(f"unknown learner {learner!r}; known: {sorted(EXAMPLES)}")
        self.learner = learner
        # whose requests teach: the served policy's, and any behaviour policy's that explores
        # for it (a writer alone, say); a good trace is imitated whoever chose its writers
        self.policies = tuple(policies)
        self.max_awaiting = max_awaiting
        self.invert = invert  # learn from 1 - reward: a deliberately bad trainer
        self.turns: dict[str, list[TurnRecord]] = {}  # of requests not finished yet
        self.awaiting: OrderedDict[str, LoggedRequest] = OrderedDict()  # oldest first
        # request ids already handed out, oldest first (a duplicate reward is ignored)
        self.used: OrderedDict[str, None] = OrderedDict()
        self.max_remembered = max_remembered
        self.reward_sum = 0.0
        self.counters = JoinCounters()
        # the request the last record handed out with its reward (for rollouts from it)
        self.rewarded_now: LoggedRequest | None = None

    @property
    def baseline(self) -> float:
        """The mean reward of the requests used so far (0.5 before the first: rewards are
        verifier scores and client ratings in [0, 1])."""
        n = self.counters.rewarded
        return self.reward_sum / n if n else 0.5

    def add(self, record: Record) -> list[RolloutExample] | list[SequenceExample]:
        """Take one record; return the examples it completes (only a reward completes any)."""
        self.rewarded_now = None
        if isinstance(record, TurnRecord):
            if record.policy in self.policies:
                self.turns.setdefault(record.request_id, []).append(record)
        elif isinstance(record, RequestRecord):
            self._finish(record)
        elif isinstance(record, FeedbackRecord):
            return self._reward(record)
        return []

    def _finish(self, record: RequestRecord) -> None:
        turns = self.turns.pop(record.request_id, [])
        if record.policy not in self.policies:
            return
        self.counters.requests += 1
        if record.error is not None or not turns:
            self.counters.failed += 1
            return
        self.awaiting[record.request_id] = LoggedRequest(record, turns)
        while len(self.awaiting) > self.max_awaiting:
            self.awaiting.popitem(last=False)
            self.counters.unrewarded += 1

    def _reward(self, record: FeedbackRecord) -> list[RolloutExample] | list[SequenceExample]:
        logged = self.awaiting.pop(record.request_id, None)
        if logged is None:
            if record.request_id in self.used:
                self.counters.duplicate_feedback += 1
            else:
                self.counters.unknown_feedback += 1
            return []
        reward = 1.0 - record.reward if self.invert else record.reward
        examples = EXAMPLES[self.learner](logged, reward, self.baseline)
        self.used[record.request_id] = None
        while len(self.used) > self.max_remembered:
            self.used.popitem(last=False)
        self.rewarded_now = logged
        self.reward_sum += reward
        self.counters.rewarded += 1
        self.counters.examples += len(examples)
        return examples

    def state(self) -> dict:
        """Everything needed to go on exactly where this joiner is (msgpack/JSON values)."""
        return {
            "policies": list(self.policies),
            "learner": self.learner,
            "max_awaiting": self.max_awaiting,
            "invert": self.invert,
            "turns": {rid: [asdict(t) for t in ts] for rid, ts in self.turns.items()},
            "awaiting": [
                {"request": asdict(lr.request), "turns": [asdict(t) for t in lr.turns]}
                for lr in self.awaiting.values()
            ],
            "used": list(self.used),
            "max_remembered": self.max_remembered,
            "reward_sum": self.reward_sum,
            "counters": asdict(self.counters),
        }

    @classmethod
    def from_state(cls, state: Mapping) -> LogJoiner:
        joiner = cls(tuple(state["policies"]), state["max_awaiting"], state["invert"],
                     state["learner"], state["max_remembered"])  # fmt: skip
        joiner.turns = {rid: _turns(ts) for rid, ts in state["turns"].items()}
        for entry in state["awaiting"]:
            request = _record(RequestRecord, entry["request"])
            joiner.awaiting[request.request_id] = LoggedRequest(request, _turns(entry["turns"]))
        joiner.used = OrderedDict.fromkeys(state["used"])
        joiner.reward_sum = float(state["reward_sum"])
        joiner.counters = JoinCounters(**state["counters"])
        return joiner


def _record(cls: type, data: Mapping) -> Record:
    """A record from its `asdict` form (sequences come back from JSON as lists)."""
    fields = dict(data)
    for name in ("token_ids", "logprobs", "gates", "models"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return cls(**fields)


def _turns(data: Sequence[Mapping]) -> list[TurnRecord]:
    return [_record(TurnRecord, t) for t in data]


__all__ = [
    "EXAMPLES",
    "JoinCounters",
    "LogJoiner",
    "LoggedRequest",
    "SequenceExample",
    "request_examples",
    "sequence_examples",
]
