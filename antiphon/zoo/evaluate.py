"""The evaluation harness core: run task splits through a `generate` callable, concurrently,
score them, and report (markdown table, JSON, plot). Plus the oracle switcher.

`generate(prompt, sampling) -> text` is any async callable: a single zoo model driven through
transformers here (`LocalGenerator`), or the coordinator / serving stack once wired in. Same
seed, same sampling seeds, same numbers.

    gen = LocalGenerator(antiphon.zoo.path("aligned"))
    results = evaluate(gen, make_tasks(world_for("full", 0), "test").values(),
                       policy="single", ensemble="aligned", split="test")
    print(markdown_table(results))

The oracle switcher (`oracle_switch`) searches, per question, for a sequence of segments of
`segment_len` tokens written by given models (greedy) whose answer the task verifier accepts:
an upper bound for what a learned switcher can reach.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar

import torch
from tqdm import tqdm

from antiphon.actors.protocol import SessionModel
from antiphon.actors.sampling import choose_tokens, find_stop_string, new_generator
from antiphon.checkpoint import cache_argument, load_checkpoint
from antiphon.config import ModelSpec
from antiphon.errors import NotFound, PromptTooLong
from antiphon.messages import SamplingParams
from antiphon.zoo.tasks import TASK_NAMES, Task, TaskItem, make_tasks

Generate = Callable[[str, SamplingParams], Awaitable[str]]
T = TypeVar("T")


class EvalResult(TypedDict, total=False):
    """One row of the results: a policy over an ensemble on one task split."""

    policy: str
    ensemble: str
    task: str
    split: str
    n: int
    score: float
    interval: tuple[float, float]  # 95% bootstrap interval of the score, where computed


def bootstrap_interval(
    n: int,
    statistic: Callable[[Sequence[int]], float],
    key: str,
    resamples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float]:
    """A percentile-bootstrap interval of `statistic` over `n` items: each resample draws n
    item indices with replacement and `statistic` scores them. The draws are seeded by `key`
    (say, the policy and the task), so a rerun gives the same interval."""
    rng = random.Random(f"bootstrap:{key}")
    scores = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    low = scores[int((1 - level) / 2 * resamples)]
    high = scores[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return round(low, 2), round(high, 2)


def score_interval(
    task: Task, outputs: Sequence[Sequence[str]], key: str, resamples: int = 1000
) -> tuple[float, float]:
    """The bootstrap interval of the task's score, each resample scored by the task's own
    metric (so validity x diversity and calibration get theirs too)."""
    return bootstrap_interval(
        len(task.items),
        lambda idx: task.score([task.items[i] for i in idx], [outputs[i] for i in idx]),
        key,
        resamples,
    )


def sample_seed(seed: int, task: str, item: int, sample: int) -> int:
    """A per-(task, item, sample) seed that does not depend on scheduling order."""
    h = 0
    for ch in task:
        h = (h * 131 + ord(ch)) % 1_000_003
    return (seed * 1_000_003 + h) * 100_003 + item * 101 + sample


async def run_task(
    generate: Callable[[str, SamplingParams], Awaitable[T]],
    task: Task,
    *,
    seed: int = 0,
    concurrency: int = 64,
    bar: tqdm | None = None,
) -> list[list[T]]:
    """All generations of a task, per item, in item order (whatever `generate` returns: its
    text, or more)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, j: int) -> str:
        async with limit:
            out = await generate(
                task.items[i].prompt, task.sampling(sample_seed(seed, task.name, i, j))
            )
        if bar is not None:
            bar.update(1)
        return out

    flat = await asyncio.gather(
        *(one(i, j) for i in range(len(task.items)) for j in range(task.samples))
    )
    return [list(flat[i * task.samples : (i + 1) * task.samples]) for i in range(len(task.items))]


async def evaluate_async(
    generate: Generate,
    tasks: Iterable[Task],
    *,
    policy: str,
    ensemble: str,
    seed: int = 0,
    concurrency: int = 64,
    progress: bool = True,
) -> list[EvalResult]:
    tasks = list(tasks)
    total = sum(len(t.items) * t.samples for t in tasks)
    results: list[EvalResult] = []
    with tqdm(
        total=total, desc=f"eval {policy}/{ensemble}", disable=not progress, leave=False
    ) as bar:
        for task in tasks:
            outputs = await run_task(generate, task, seed=seed, concurrency=concurrency, bar=bar)
            score = round(task.score(task.items, outputs), 2)
            interval = score_interval(task, outputs, f"{policy}/{ensemble}/{task.name}")
            results.append(
                EvalResult(
                    policy=policy,
                    ensemble=ensemble,
                    task=task.name,
                    split=task.split,
                    n=len(task.items),
                    score=score,
                    interval=interval,
                )
            )
    return results


def evaluate(generate: Generate, tasks: Iterable[Task], **kwargs) -> list[EvalResult]:
    """Synchronous `evaluate_async` (runs its own event loop)."""
    return asyncio.run(evaluate_async(generate, tasks, **kwargs))


def zoo_tasks(
    split: str = "test", names: Sequence[str] = TASK_NAMES, zoo_dir: Path | None = None
) -> dict[str, Task]:
    """The task splits of the world a zoo was trained on (its zoo.json names seed and scale);
    by default the zoo shipped in the package."""
    from antiphon.zoo import CHECKPOINT_DIR
    from antiphon.zoo.build import world_for

    manifest_path = Path(zoo_dir or CHECKPOINT_DIR) / "zoo.json"
    if not manifest_path.exists():
        raise NotFound(f"no zoo at {manifest_path.parent} (zoo.json missing): build one first")
    manifest = json.loads(manifest_path.read_text())
    return make_tasks(world_for(manifest["scale"], manifest["seed"]), split, names)


# ---------------------------------------------------------------------------------------------
# Reports


def markdown_table(results: Sequence[EvalResult]) -> str:
    """Rows: policy/ensemble; columns: tasks; cells: score."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    rows = list(dict.fromkeys((r["policy"], r["ensemble"]) for r in results))
    cell = {(r["policy"], r["ensemble"], r["task"]): r["score"] for r in results}
    lines = [
        "| policy | ensemble | " + " | ".join(tasks) + " |",
        "|---|---|" + "---:|" * len(tasks),
    ]
    for p, e in rows:
        vals = [f"{cell[(p, e, t)]:.1f}" if (p, e, t) in cell else "" for t in tasks]
        lines.append(f"| {p} | {e} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_json(results: Sequence[EvalResult], path: Path, **extra: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": list(results), **extra}, indent=2) + "\n")
    return path


def plot(results: Sequence[EvalResult], path: Path) -> Path:
    """Grouped bars: one group per task, one bar per policy/ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    rows = list(dict.fromkeys((r["policy"], r["ensemble"]) for r in results))
    cell = {(r["policy"], r["ensemble"], r["task"]): r for r in results}
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(rows)) * 0.35 + 3), 4))
    for k, (p, e) in enumerate(rows):
        xs = [i + k * width for i in range(len(tasks))]
        got = [cell.get((p, e, t), {}) for t in tasks]
        heights = [r.get("score", 0.0) for r in got]
        errors = None
        if all("interval" in r for r in got):  # error bars from the 95% intervals
            pairs = list(zip(heights, got, strict=True))
            errors = [
                [h - r["interval"][0] for h, r in pairs],
                [r["interval"][1] - h for h, r in pairs],
            ]
        ax.bar(xs, heights, width, yerr=errors, capsize=2, label=f"{p}/{e}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# A single checkpoint through transformers, batched


@dataclass
class _Request:
    prompt: str
    sampling: SamplingParams
    future: asyncio.Future


class _Generator:
    """The harness's `generate(prompt, sampling) -> text` and the oracle's greedy `segment`,
    both over a subclass's `generate_with_status(prompt, sampling) -> (text, ended with eos)`."""

    async def generate_with_status(self, prompt: str, sampling: SamplingParams) -> tuple[str, bool]:
        raise NotImplementedError

    async def __call__(self, prompt: str, sampling: SamplingParams) -> str:
        text, _ = await self.generate_with_status(prompt, sampling)
        return text

    async def segment(self, prompt: str, n_tokens: int) -> tuple[str, bool]:
        """Greedy continuation of at most n_tokens; (text, ended: with eos, or because the
        model's context is full, where an answer ends as it stands)."""
        try:
            return await self.generate_with_status(prompt, SamplingParams(max_new_tokens=n_tokens))
        except PromptTooLong:
            return "", True


class LocalGenerator(_Generator):
    """One HF checkpoint driven through plain transformers in this process (a cross-check of
    the engine). Requests issued together (e.g. by `asyncio.gather`) are decoded as one
    left-padded batch with a KV cache. Tokens are chosen by the engine's sampler
    (`antiphon.actors.sampling`), each request with its own seeded generator, so outputs do
    not depend on batching and sampled numbers are the served ones."""

    def __init__(self, model_dir: str | Path, max_batch: int = 32) -> None:
        self.model, self.tokenizer = load_checkpoint(
            ModelSpec(name=Path(model_dir).name, path=str(model_dir))
        )
        self.cache_argument = cache_argument(self.model)
        self.max_batch = max_batch
        self._pending: list[_Request] = []
        self._scheduled = False

    async def generate_with_status(self, prompt: str, sampling: SamplingParams) -> tuple[str, bool]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append(_Request(prompt, sampling, fut))
        if not self._scheduled:
            # Flush after every request already scheduled has enqueued: one batch per wave.
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            chunk = pending[start : start + self.max_batch]
            try:
                outs = self.decode([r.prompt for r in chunk], [r.sampling for r in chunk])
            except Exception as exc:  # hand the failure to every waiter of this chunk
                for r in chunk:
                    r.future.set_exception(exc)
                continue
            for r, out in zip(chunk, outs, strict=True):
                r.future.set_result(out)

    @torch.no_grad()
    def decode(
        self, prompts: Sequence[str], params: Sequence[SamplingParams]
    ) -> list[tuple[str, bool]]:
        """Decode a batch; returns (text without eos, ended with eos) per prompt."""
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        enc = [tok.encode(p) for p in prompts]
        B, L = len(enc), max(len(e) for e in enc)
        ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)  # (B, L) left-padded
        mask = torch.zeros((B, L), dtype=torch.long)  # (B, L)
        for i, e in enumerate(enc):
            ids[i, L - len(e) :] = torch.tensor(e)
            mask[i, L - len(e) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        logits = out.logits[:, -1, :]  # (B, V)
        gens = [new_generator(p.seed if p.seed is not None else 0) for p in params]
        new: list[list[int]] = [[] for _ in range(B)]
        ended = [False] * B
        done = [False] * B
        for _ in range(max(p.max_new_tokens for p in params)):
            chosen, _, _ = choose_tokens(logits, list(params), gens)
            nxt = torch.tensor(chosen)  # (B,)
            for i, p in enumerate(params):
                if done[i]:
                    continue
                t = chosen[i]
                if t == eos and not p.ignore_eos:
                    done[i] = ended[i] = True
                    continue
                new[i].append(t)
                if len(new[i]) >= p.max_new_tokens or (
                    p.stop_strings
                    and find_stop_string(tok.decode(new[i]), p.stop_strings) is not None
                ):
                    done[i] = True
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.long)], dim=1)  # (B, L+t)
            pos = pos[:, -1:] + 1  # (B, 1)
            out = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{self.cache_argument: out[self.cache_argument]},
            )
            logits = out.logits[:, -1, :]
        results = []
        for i, p in enumerate(params):
            text = tok.decode(new[i])
            cut = find_stop_string(text, p.stop_strings)
            results.append((text if cut is None else text[:cut], ended[i]))
        return results


class SessionGenerator(_Generator):
    """Any `SessionModel` (the in-process `ModelEngine`, or the Serve client) as a `generate`
    callable: each request opens a session on the prompt, generates once, and closes it."""

    def __init__(self, model: SessionModel) -> None:
        self.model = model

    async def generate_with_status(self, prompt: str, sampling: SamplingParams) -> tuple[str, bool]:
        session = await self.model.open(prompt)
        try:
            gen = await self.model.generate(session.session_id, sampling)
        finally:
            await self.model.close(session.session_id)
        return gen.text, gen.finish_reason == "eos"


# ---------------------------------------------------------------------------------------------
# Oracle switcher

Segment = Callable[[str, int], Awaitable[tuple[str, bool]]]  # (prompt, n_tokens) -> (text, eos)


@dataclass(frozen=True)
class OracleResult:
    """The best switch sequence found for one question."""

    score: float  # verifier score of the best answer found
    answer: str
    models: tuple[str, ...]  # the model of each segment, in order


async def oracle_switch(
    item: TaskItem,
    verify: Callable[[TaskItem, str], float],
    models: dict[str, Segment],
    *,
    segment_len: int,
    max_segments: int,
    prefix_ok: Callable[[str], bool] | None = None,
) -> OracleResult:
    """Depth-first search over switch sequences: at each segment every model writes
    `segment_len` tokens greedily; a sequence ends at eos or after `max_segments` segments.
    With `prefix_ok` (for tasks with an exact answer: is this text still a prefix of it?)
    branches that went wrong are cut, which makes long sequences affordable; without it the
    search is exhaustive. Stops at the first answer scoring 1."""
    best = OracleResult(0.0, "", ())
    names = list(models)
    # Answers already expanded: models often write the same segment, and a text reached once
    # needs no second search (without this, backtracking is exponential in the depth).
    seen: set[tuple[str, int]] = set()

    async def dfs(answer: str, seq: tuple[str, ...]) -> bool:
        nonlocal best
        segs = await asyncio.gather(*(models[m](item.prompt + answer, segment_len) for m in names))
        for m, (text, ended) in zip(names, segs, strict=True):
            new, new_seq = answer + text, seq + (m,)
            if (new, ended) in seen:
                continue
            seen.add((new, ended))
            if ended or len(new_seq) == max_segments:
                s = verify(item, new)
                if s > best.score or not best.models:
                    best = OracleResult(s, new, new_seq)
                if s >= 1.0:
                    return True
                continue
            if prefix_ok is not None and not prefix_ok(new):
                continue
            if await dfs(new, new_seq):
                return True
        return False

    await dfs("", ())
    return best


async def oracle_task_score(
    task: Task,
    models: dict[str, Segment],
    *,
    segment_len: int,
    max_segments: int,
    exact: bool = True,
    progress: bool = True,
) -> tuple[float, list[OracleResult]]:
    """Oracle score of a task (100 x mean best verifier score). exact=True prunes with
    'the answer so far is a prefix of the reference' (tasks whose reference is the answer)."""
    bar = tqdm(total=len(task.items), desc=f"oracle {task.name}", disable=not progress, leave=False)

    async def one(item: TaskItem) -> OracleResult:
        # Answers are written after "A:" as " " + answer (the SFT format).
        prefix_ok = (lambda text: (" " + item.reference).startswith(text)) if exact else None
        r = await oracle_switch(
            item,
            task.verify,
            models,
            segment_len=segment_len,
            max_segments=max_segments,
            prefix_ok=prefix_ok,
        )
        bar.update(1)
        return r

    results = await asyncio.gather(*(one(it) for it in task.items))
    bar.close()
    return 100.0 * sum(r.score for r in results) / max(1, len(results)), list(results)
