"""Rollouts that label the switcher's training data (METHODS.md, Switch Generation):

1. a dev query; a response written by switching models uniformly at random (`random_switch`;
   `prefix_policy` may name another, e.g. the previous round's switcher);
2. a cut at a random point, 10-90% of its tokens: the prefix (with `empty_first_prefix`,
   prefix 0 of each query is empty instead: the first decision);
3. each candidate model writes the next segment after the prefix;
4. each branch is completed k times by random switching (`replay_switch` replays the prefix
   and the branch's segment, then switches at random; with `completion_switcher`, a trained
   switcher picks the writers of the rest instead: on-policy completions);
5. each completion is scored by the task's verifier; a candidate's utility is the mean score
   (for a task whose metric reads a set of answers, e.g. validity x diversity of stories: the
   metric over the branch's k completions); the label is the argmax.

Ties: `best` keeps every candidate whose utility equals the maximum (the trainer maximises
their total probability); `label` is the lowest index among them. An example whose utilities
are all equal carries no preference and is kept in the file but skipped by the trainer.
Completion r of every branch uses the same seed for its random switching and for its sampling
after the prefix (common random numbers), so utilities differ by the branch, not by the luck
of the continuation; the k completions of one branch sample apart (`replay_switch`).

Every run goes through a `Generate` callable: `Coordinator.generate` over in-process engines,
or the coordinator deployment on a Ray cluster (`serve_generate(handle)`): the items run
concurrently (`concurrency` at a time), so the model replicas batch their sessions.

    store = RolloutStore("runs/rollouts")                  # examples.jsonl + provenance.json
    examples = asyncio.run(run_rollouts(coordinator.generate, queries, ("base", "sft"),
                                        RolloutConfig(k=4, segment_len=16), store))

The output is append-only (one JSON line per (query, prefix)); a rerun skips done keys.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tqdm import tqdm

from antiphon.coordinator.request import GenerationRequest, GenerationResult
from antiphon.errors import retry_overloaded
from antiphon.training.durable import write_json_atomic, write_text_atomic

Generate = Callable[[GenerationRequest], Awaitable[GenerationResult]]
EXAMPLES_FILE = "examples.jsonl"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class RolloutQuery:
    """One dev question and how to score an answer to it."""

    key: str  # unique id, e.g. "arithmetic:17"
    task: str
    prompt: str
    verify: Callable[[str], float]  # the generated text -> score in [0, 1]
    max_tokens: int
    temperature: float = 0.0
    # A metric over several answers to the query (e.g. validity x diversity of stories), in
    # [0, 1]: a branch's utility is it over the branch's k completions, not their mean score.
    score_set: Callable[[Sequence[str]], float] | None = None
    samples: int = 1  # answers the task's metric reads per query (what score_set expects)

    def utility(self, texts: Sequence[str]) -> float:
        """The query's score of a set of answers: score_set, else the mean verified score."""
        if self.score_set is not None:
            return float(self.score_set(texts))
        return sum(float(self.verify(t)) for t in texts) / max(1, len(texts))


@dataclass(frozen=True)
class RolloutConfig:
    k: int = 4  # random-switch completions per branch
    segment_len: int = 16  # tokens per segment (prefix, branch and completions)
    prefixes_per_query: int = 1  # random prefixes cut per query
    cut_low: float = 0.1  # the cut falls in [cut_low, cut_high] of the random response
    cut_high: float = 0.9
    # Prefix 0 of every query is empty (the first decision) instead of a random cut. Not in
    # the paper; on short answers the first segment decides most of the outcome, and the
    # random cuts label it rarely.
    empty_first_prefix: bool = False
    # Who writes the response the prefix is cut from: random switching (the paper), or e.g.
    # `switch` with the previous round's switcher, so that later rounds label the states the
    # switcher itself reaches (DAgger-style on-policy data); completions stay random.
    prefix_policy: str = "random_switch"
    prefix_policy_params: Mapping[str, object] = field(default_factory=dict)
    # Who completes each branch: random switching (the paper), or a `switch` policy's
    # parameters (e.g. the previous round's switcher sampling top-p), so that a branch is
    # labelled by what follows when the switcher itself writes on (on-policy completions).
    completion_switcher: Mapping[str, object] | None = None
    seed: int = 0
    concurrency: int = 8  # (query, prefix) items in flight at once


def example_key(query_key: str, state: str) -> str:
    """An example's key, "<query key>:<state>": the trainer splits train from validation by
    the query key, read back as everything before the last ":" (`RolloutExample.query_key`),
    so the state part may hold no ":"."""
    if ":" in state:
        raise ValueError(f"an example's state {state!r} may not contain ':'")
    return f"{query_key}:{state}"


@dataclass
class RolloutExample:
    """One labelled (query, prefix): what the switcher is trained on."""

    key: str  # `example_key(query key, prefix index or state)`
    task: str
    query: str
    models: list[str]  # the ensemble; indices below refer to it
    prefix: list[tuple[int, str]]  # (writer index, text) of each prefix segment
    utilities: list[float]  # per candidate: mean verifier score of its k completions
    scores: list[list[float]]  # per candidate: the k completion scores
    best: list[int]  # every candidate with the maximal utility
    label: int  # lowest index in best
    prefix_tokens: int  # tokens in the prefix
    total_tokens: int  # tokens of the random response the prefix was cut from

    @property
    def query_key(self) -> str:
        """The key of the query this example labels a state of (see `example_key`)."""
        return self.key.rsplit(":", 1)[0]

    @property
    def informative(self) -> bool:
        """False when every candidate is equally good (no preference to learn)."""
        return len(self.best) < len(self.models)

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> RolloutExample:
        fields = dict(d)
        fields["prefix"] = [(int(i), str(t)) for i, t in fields["prefix"]]
        return cls(**fields)


def label_from_utilities(utilities: Sequence[float], tol: float = 1e-9) -> tuple[list[int], int]:
    """(every index with the maximal utility, the lowest of them)."""
    top = max(utilities)
    best = [i for i, u in enumerate(utilities) if u >= top - tol]
    return best, best[0]


def cut_point(total: int, rng: random.Random, low: float, high: float) -> int:
    """A random cut in [ceil(low * total), floor(high * total)], at least 1 and below total."""
    lo = max(1, math.ceil(low * total))
    hi = min(total - 1, max(lo, math.floor(high * total)))
    return rng.randint(lo, hi)


def prefix_decisions(segments: Sequence[tuple[str, int]], cut: int) -> tuple[list[str], list[int]]:
    """The (writer, tokens) decisions that rewrite the first `cut` tokens of a response made
    of `segments` (writer, tokens): whole segments, then the cut one's first tokens."""
    models, tokens, left = [], [], cut
    for model, n in segments:
        if left <= 0:
            break
        models.append(model)
        tokens.append(min(n, left))
        left -= n
    return models, tokens


def _request(
    q: RolloutQuery,
    models: tuple[str, ...],
    policy: str,
    params: dict[str, object],
    seed: int,
) -> GenerationRequest:
    return GenerationRequest(
        prompt=q.prompt,
        models=models,
        policy=policy,
        policy_params=params,
        max_tokens=q.max_tokens,
        temperature=q.temperature,
        seed=seed,
    )


async def label_query(
    generate: Generate,
    q: RolloutQuery,
    models: tuple[str, ...],
    cfg: RolloutConfig,
    prefix_index: int,
) -> RolloutExample | None:
    """Roll out one (query, prefix); None if the random response is too short to cut."""
    rng = random.Random(f"rollout:{cfg.seed}:{q.key}:{prefix_index}")
    request_seed = rng.randrange(2**31)  # same for every run below: the prefix replays exactly
    first = await generate(
        _request(
            q,
            models,
            cfg.prefix_policy,
            {
                **cfg.prefix_policy_params,
                "segment_len": cfg.segment_len,
                "seed": rng.randrange(2**31),
            },  # fmt: skip
            request_seed,
        )
    )
    written = [(s.model, len(s.token_ids)) for s in first.segments]
    total = sum(n for _, n in written)
    if total < 2:
        return None
    cut = cut_point(total, rng, cfg.cut_low, cfg.cut_high)
    if cfg.empty_first_prefix and prefix_index == 0:
        cut = 0
    prefix_models, prefix_tokens = prefix_decisions(written, cut)
    return await label_prefix(
        generate, q, models, cfg, (prefix_models, prefix_tokens), rng, request_seed,
        key=example_key(q.key, str(prefix_index)), total_tokens=total,
    )  # fmt: skip


async def label_prefix(
    generate: Generate,
    q: RolloutQuery,
    models: tuple[str, ...],
    cfg: RolloutConfig,
    prefix: tuple[Sequence[str], Sequence[int]],
    rng: random.Random,
    request_seed: int,
    *,
    key: str,
    total_tokens: int,
) -> RolloutExample:
    """Steps 3-5 for one prefix, its writers' decisions (models, tokens): each candidate's
    branch, completed k times and verified; the example `key` of a response of
    `total_tokens` tokens."""
    prefix_models, prefix_tokens = prefix
    completion_seeds = [rng.randrange(2**31) for _ in range(cfg.k)]

    async def complete(candidate: str, r: int) -> GenerationResult:
        params = {
            "prefix_models": [*prefix_models, candidate],
            "prefix_tokens": [*prefix_tokens, cfg.segment_len],
            "segment_len": cfg.segment_len,
            "seed": completion_seeds[r],
        }
        if cfg.completion_switcher is not None:
            params["completion_switcher"] = {
                **cfg.completion_switcher,
                "segment_len": cfg.segment_len,
            }
        return await generate(_request(q, models, "replay_switch", params, request_seed))

    results = await asyncio.gather(*(complete(c, r) for c in models for r in range(cfg.k)))
    texts = [[results[i * cfg.k + r].text for r in range(cfg.k)] for i in range(len(models))]
    scores = [[float(q.verify(t)) for t in branch] for branch in texts]
    utilities = [q.utility(branch) for branch in texts]
    best, label = label_from_utilities(utilities)
    replayed = results[0].segments[: len(prefix_models)]
    return RolloutExample(
        key=key,
        task=q.task,
        query=q.prompt,
        models=list(models),
        prefix=[(models.index(s.model), s.text) for s in replayed],
        utilities=utilities,
        scores=scores,
        best=best,
        label=label,
        prefix_tokens=sum(prefix_tokens),
        total_tokens=total_tokens,
    )


class RolloutStore:
    """A directory of examples.jsonl (one line per done key, examples and skipped items
    alike) and provenance.json: appended to key by key (`run_rollouts` resumes where it
    stopped), or written whole (`write_all`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = {rec["key"] for rec in self._records()}  # keys already labelled

    @property
    def path(self) -> Path:
        return self.root / EXAMPLES_FILE

    def _records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash: its key is redone
        return out

    def examples(self) -> list[RolloutExample]:
        return [RolloutExample.from_json(r) for r in self._records() if not r.get("skipped")]

    def append(self, key: str, example: RolloutExample | None) -> None:
        record = asdict(example) if example is not None else {"key": key, "skipped": True}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.done.add(key)

    @property
    def finished(self) -> bool:
        """Whether a whole labelling run ended here: its provenance is written and not marked
        "running" (a run cut by a crash leaves the mark, or no provenance at all)."""
        try:
            provenance = json.loads((self.root / PROVENANCE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return provenance.get("status", "done") == "done"

    def write_all(
        self, examples: Sequence[RolloutExample], provenance: Mapping[str, object]
    ) -> None:
        """Replace the store's examples with `examples` in one step, then mark it finished:
        for labellers that make all their examples at once, so that a crash part way leaves
        an unfinished store (redone by the next run), never a partial one read as whole."""
        write_text_atomic(self.path, "".join(json.dumps(asdict(ex)) + "\n" for ex in examples))
        self.done = {ex.key for ex in examples}
        self.write_provenance({**provenance, "status": "done"})

    def write_provenance(self, provenance: Mapping[str, object]) -> None:
        write_json_atomic(self.root / PROVENANCE_FILE, provenance)


async def run_rollouts(
    generate: Generate,
    queries: Sequence[RolloutQuery],
    models: Sequence[str],
    cfg: RolloutConfig,
    store: RolloutStore,
    provenance: Mapping[str, object] | None = None,
    progress: bool = True,
) -> list[RolloutExample]:
    """Label every (query, prefix) not yet in the store; return all examples in the store."""
    models = tuple(models)
    generate = retrying(generate)
    todo = [
        (q, j)
        for q in queries
        for j in range(cfg.prefixes_per_query)
        if f"{q.key}:{j}" not in store.done
    ]
    run_info = {
        **(provenance or {}),
        "models": list(models),
        "config": asdict(cfg),
        "queries": len(queries),
        "tasks": sorted({q.task for q in queries}),
        "started": time.time(),
    }
    store.write_provenance({**run_info, "status": "running"})
    limit = asyncio.Semaphore(cfg.concurrency)
    with tqdm(total=len(todo), desc="rollouts", disable=not progress) as bar:

        async def one(q: RolloutQuery, j: int) -> None:
            async with limit:
                example = await label_query(generate, q, models, cfg, j)
            store.append(f"{q.key}:{j}", example)
            bar.update(1)

        await asyncio.gather(*(one(q, j) for q, j in todo))
    examples = store.examples()
    store.write_provenance(
        {
            **run_info,
            "finished": time.time(),
            "examples": len(examples),
            "informative": sum(e.informative for e in examples),
            "status": "done",
        }
    )
    return examples


def retrying(generate: Generate) -> Generate:
    """`generate` that waits out a full model (Overloaded) instead of losing the item."""

    async def call(request: GenerationRequest) -> GenerationResult:
        return await retry_overloaded(lambda: generate(request))

    return call


def serve_generate(handle) -> Generate:
    """A `Generate` over a coordinator deployment handle (rollouts on a Ray cluster)."""

    async def generate(request: GenerationRequest) -> GenerationResult:
        return await handle.generate.remote(request)

    return generate


def queries_from_tasks(
    tasks: Mapping[str, object],
    limit: int | None = None,
    rewards: Mapping[str, Callable[[object, str], float]] | None = None,
) -> list[RolloutQuery]:
    """Rollout queries from zoo tasks (`antiphon.zoo.tasks.Task`), at most `limit` items per
    task. Each is scored by its task: the verifier per answer, and the task's own metric over
    a set of answers (`task.score` of the one item, / 100), which for a mean-verified task is
    the mean and for creativity or calibration is what the test split measures. Where
    `rewards[task name](item, text)` is given (e.g. a dense reward for a task whose verifier
    random completions almost never satisfy) it replaces both, averaged over the set."""
    out = []
    for name, task in tasks.items():
        reward = (rewards or {}).get(name)
        for i, item in enumerate(task.items[:limit]):
            if reward is not None:
                verify = partial(reward, item)
                score_set = None
            else:
                verify = partial(task.verify, item)
                score_set = partial(_item_metric, task, item)
            out.append(
                RolloutQuery(
                    key=f"{name}:{i}",
                    task=name,
                    prompt=item.prompt,
                    verify=verify,
                    max_tokens=task.max_new_tokens,
                    temperature=task.temperature,
                    score_set=score_set,
                    samples=task.samples,
                )
            )
    return out


def _item_metric(task, item, texts: Sequence[str]) -> float:
    return task.score([item], [list(texts)]) / 100.0
