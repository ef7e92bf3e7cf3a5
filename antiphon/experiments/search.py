"""The weak-to-strong search experiment on the zoo's search task, end to end: `strong` (the
large model, frozen) steered by `guide-tuned` / `guide-untuned` (the small pair; the tuned one
learnt to write positive reviews), on the review openings of the sentiment task; writes
results/search.json, .md and .png (every score with its 95% bootstrap interval).

    python -m antiphon.experiments.search              # the committed results
    python -m antiphon.experiments.search --limit 3    # smoke

Rows, same per-item seeds, `SAMPLES` generations per test item:
- `unguided`: strong samples alone (temperature 1), one response per generation;
- `bon`: Best-of-N, N = 16 whole responses of strong, the guides' best kept (W=1, K=N, L=inf);
- `cbs`: chunk-level beam search W=K=4 (16 chunks sampled per step, as many strong tokens as
  BoN), L chosen on the dev split;
- `eft`: token-level emulated fine-tuning, softmax(l_strong + beta (l_tuned - l_untuned)) (the
  vocabularies match), beta chosen on the dev split;
- `guides_alone`: the tuned guide writing alone (what the small pair can do by itself);
- `cbs_blackbox`, `bon_blackbox`, `unguided_blackbox`: the same with strong reached only over
  an OpenAI-compatible completions endpoint (a second antiphon server serving strong; text in,
  text out; the guides re-tokenize its text).

Metrics per response: `gold_reward` (share of positive sentiment words, the task's gold
reward), `quality` (a whole sentence in the world's words naming the item: what the large model
is good at and the small guides are not) and `reward_x_quality` (their product); scores are
100 x the mean over items of the mean over samples. `strong_tokens`: the large-model tokens
sampled per response (every chunk of every beam, kept or not), read from the engine's counter
(or the endpoint's usage). The plot: gold reward against strong tokens per response for BoN
(N = 1..16) and CBS (a few W, K, L).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from antiphon.actors.engine import ModelEngine
from antiphon.actors.protocol import SessionModel
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.policies.fusion import FusionGenerator
from antiphon.training.policy_runs import run_policy, texts
from antiphon.zoo.evaluate import bootstrap_interval, run_task, zoo_tasks
from antiphon.zoo.tasks import Task

PROPOSER, TUNED, UNTUNED = "strong", "guide-tuned", "guide-untuned"
BLACKBOX = "strong-endpoint"  # strong behind a completions endpoint
SAMPLES = 8  # generations per item: the task's 14 test items alone give wide intervals
N = 16  # BoN's N; CBS samples W*K = 16 chunks per step
WIDTH = SUCCESSORS = 4
CHUNK_LENS = (4, 8, 16)  # L, chosen on dev
EFT_BETAS = (0.5, 1.0, 2.0)  # beta, chosen on dev
BON_SWEEP = (1, 2, 4, 8, 16)
CBS_SWEEP = ((2, 2), (2, 4), (4, 4))  # (W, K) at the chosen L; and (4, 4) at every L
METRICS = ("gold_reward", "quality", "reward_x_quality")
ROWS = ("unguided", "bon", "cbs", "eft", "guides_alone",
        "unguided_blackbox", "bon_blackbox", "cbs_blackbox")  # fmt: skip
MAX_SESSIONS = 4096
# the endpoint server takes every chunk of every request in flight at once (32 x 16)
ENDPOINT_LIMIT = 1024


@dataclasses.dataclass(frozen=True)
class Row:
    """One method's test responses (per item, per sample) and the strong tokens it sampled."""

    outputs: list[list[str]]
    strong_tokens: float  # per response


class Tasks:
    """The search task's two verifiers over the same items: gold reward and quality."""

    def __init__(self, split: str, samples: int, limit: int | None) -> None:
        both = zoo_tasks(split, ["sentiment", "review-quality"])
        cut = lambda t: dataclasses.replace(t, items=t.items[:limit], samples=samples)  # noqa: E731
        self.reward, self.quality = cut(both["sentiment"]), cut(both["review-quality"])
        assert self.reward.items == self.quality.items

    @property
    def task(self) -> Task:
        return self.reward

    def per_item(self, outputs: list[list[str]], metric: str) -> list[float]:
        """Mean over each item's samples of one metric, in [0, 1]."""

        def one(item, text: str) -> float:
            g, q = self.reward.verify(item, text), self.quality.verify(item, text)
            return {"gold_reward": g, "quality": q, "reward_x_quality": g * q}[metric]

        items = self.reward.items
        return [sum(one(items[i], t) for t in outs) / len(outs) for i, outs in enumerate(outputs)]

    def scores(self, row: str, r: Row) -> tuple[dict, dict]:
        scores, intervals = {}, {}
        for m in METRICS:
            vals = self.per_item(r.outputs, m)
            scores[m] = round(100 * sum(vals) / len(vals), 2)
            intervals[m] = bootstrap_interval(
                len(vals), lambda idx, v=vals: 100 * sum(v[i] for i in idx) / len(idx),
                key=f"search:{row}:{m}",
            )  # fmt: skip
        return scores, intervals


class Harness:
    """Every method over one split, on one coordinator (proposer white-box and black-box)."""

    def __init__(self, models: dict[str, SessionModel], tokenizers: dict, tasks: Tasks,
                 seed: int, tokens_sampled: dict[str, Callable[[], int]]) -> None:  # fmt: skip
        self.models, self.tasks, self.seed = models, tasks, seed
        self.coord = Coordinator(models, tokenizers)
        self.tokenizer = tokenizers[PROPOSER]
        self.tokens_sampled = tokens_sampled  # proposer name -> its counter

    async def policy(self, proposer: str, policy: str, params: dict) -> Row:
        counter = self.tokens_sampled[proposer]
        before = counter()
        runs = await run_policy(self.coord, (proposer, TUNED, UNTUNED), policy, params,
                                self.tasks.task, seed=self.seed)  # fmt: skip
        outputs = texts(runs)
        return Row(outputs, (counter() - before) / sum(len(o) for o in outputs))

    async def unguided(self, proposer: str, writer: str | None = None) -> Row:
        return await self.policy(
            proposer, "fixed", {"model": writer or proposer, "segment_len": 64}
        )

    async def search(
        self, proposer: str, width: int, successors: int, chunk_len: int | None
    ) -> Row:
        params = {"proposer": proposer, "tuned": TUNED, "untuned": UNTUNED, "width": width,
                  "successors": successors, "chunk_len": chunk_len}  # fmt: skip
        return await self.policy(proposer, "w2s_search", params)

    async def eft(self, beta: float) -> Row:
        fused = FusionGenerator(
            {n: self.models[n] for n in (PROPOSER, TUNED, UNTUNED)}, self.tokenizer,
            coefficients=(1.0, beta, -beta),
        )  # fmt: skip
        outputs = await run_task(fused, self.tasks.task, seed=self.seed, concurrency=16)
        tokens = sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                     for o in outputs for t in o)  # fmt: skip
        return Row(outputs, tokens / sum(len(o) for o in outputs))


def engines(zoo: str) -> dict[str, ModelEngine]:
    """The three models in process; a search holds ~2 W K sessions per request in flight."""
    return {n: ModelEngine(ModelSpec(name=n, path=f"{zoo}{n}", max_sessions=MAX_SESSIONS))
            for n in (PROPOSER, TUNED, UNTUNED)}  # fmt: skip


@contextlib.asynccontextmanager
async def blackbox_strong(zoo: str):
    """strong served by a second antiphon app over HTTP (Ray Serve on a local Ray), and a
    `CompletionsModel` that reaches it as any OpenAI-compatible completions endpoint."""
    import ray
    from ray import serve

    from antiphon.actors.endpoint import CompletionsModel
    from antiphon.deploy.app import build_app, free_port
    from antiphon.deploy.config import parse_config

    turn_log_dir = tempfile.mkdtemp(prefix="antiphon-search-")  # the served app's own log
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    config = parse_config({
        "models": [{"name": PROPOSER, "path": f"{zoo}{PROPOSER}",
                    "deployment": {"max_ongoing_requests": ENDPOINT_LIMIT},
                    "max_sessions": MAX_SESSIONS}],
        "ensembles": [{"name": PROPOSER, "models": [PROPOSER],
                       "policy": {"name": "fixed", "params": {"model": PROPOSER}}}],
        "serving": {"max_concurrent_requests": ENDPOINT_LIMIT,
                    "turn_log_path": f"{turn_log_dir}/turns.atl"},
    })  # fmt: skip
    serve.run(build_app(config), name="search-endpoint", route_prefix="/")
    from ray.serve.context import _get_global_client

    url = f"http://127.0.0.1:{_get_global_client().http_config.port}/v1"
    spec = ModelSpec(name=BLACKBOX, path=f"{zoo}{PROPOSER}",
                     endpoint={"base_url": url, "model": PROPOSER},
                     max_sessions=MAX_SESSIONS)  # fmt: skip
    model = CompletionsModel(spec)
    try:
        yield model
    finally:
        serve.shutdown()
        ray.shutdown()


def pick(candidates: dict, rows: dict[object, Row], tasks: Tasks) -> object:
    """The candidate with the best dev gold reward (the first of equals)."""
    score = {c: tasks.scores("dev", rows[c])[0]["gold_reward"] for c in candidates}
    return max(candidates, key=lambda c: score[c]), score


async def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    zoo = f"{args.zoo_dir}/" if args.zoo_dir else "zoo:"
    local = engines(zoo)
    tokenizers = {n: load_tokenizer(f"{zoo}{n}") for n in local}
    counters = {PROPOSER: lambda: local[PROPOSER].stats().tokens_generated}
    notes: list[str] = []
    try:
        # -- dev: L for CBS, beta for EFT ---------------------------------------------------
        dev = Tasks("dev", args.dev_samples, args.limit)
        h = Harness(local, tokenizers, dev, args.seed, counters)
        dev_cbs = {L: await h.search(PROPOSER, WIDTH, SUCCESSORS, L) for L in CHUNK_LENS}
        chunk_len, dev_cbs_scores = pick(CHUNK_LENS, dev_cbs, dev)
        dev_eft = {b: await h.eft(b) for b in EFT_BETAS}
        beta, dev_eft_scores = pick(EFT_BETAS, dev_eft, dev)
        # -- test ---------------------------------------------------------------------------
        test = Tasks("test", args.samples, args.limit)
        h = Harness(local, tokenizers, test, args.seed, counters)
        rows: dict[str, Row] = {
            "unguided": await h.unguided(PROPOSER),
            "bon": await h.search(PROPOSER, 1, N, None),
            "cbs": await h.search(PROPOSER, WIDTH, SUCCESSORS, chunk_len),
            "eft": await h.eft(beta),
            "guides_alone": await h.unguided(PROPOSER, writer=TUNED),
        }
        sweep = {f"bon N={n}": (await h.search(PROPOSER, 1, n, None) if n != N else rows["bon"])
                 for n in BON_SWEEP}  # fmt: skip
        cbs_configs = [(w, k, chunk_len) for w, k in CBS_SWEEP]
        cbs_configs += [(WIDTH, SUCCESSORS, L) for L in CHUNK_LENS if L != chunk_len]
        for w, k, L in cbs_configs:
            same = (w, k, L) == (WIDTH, SUCCESSORS, chunk_len)
            sweep[f"cbs W={w} K={k} L={L}"] = rows["cbs"] if same else await h.search(
                PROPOSER, w, k, L)  # fmt: skip
        if args.blackbox:
            async with blackbox_strong(zoo) as endpoint:
                models = {**local, BLACKBOX: endpoint}
                bb_tok = {**tokenizers, BLACKBOX: tokenizers[PROPOSER]}
                bb_counters = {**counters, BLACKBOX: lambda: endpoint.tokens_sampled}
                hb = Harness(models, bb_tok, test, args.seed, bb_counters)
                rows["unguided_blackbox"] = await hb.unguided(BLACKBOX)
                rows["bon_blackbox"] = await hb.search(BLACKBOX, 1, N, None)
                rows["cbs_blackbox"] = await hb.search(BLACKBOX, WIDTH, SUCCESSORS, chunk_len)
    finally:
        for e in local.values():
            await e.shutdown()
    scores, intervals = {}, {}
    for name, r in rows.items():
        scores[name], intervals[name] = test.scores(name, r)
        scores[name]["strong_tokens"] = round(r.strong_tokens, 1)
    curve = {}
    for name, r in sweep.items():
        s, iv = test.scores(name, r)
        curve[name] = {"strong_tokens": round(r.strong_tokens, 1), "gold_reward": s["gold_reward"],
                       "interval": iv["gold_reward"]}  # fmt: skip
    summary = claims(scores, intervals)
    examples = {name: r.outputs[0][0] for name, r in rows.items()}
    setup = {
        "command": "python -m antiphon.experiments.search", "seconds": time.perf_counter() - t0,
        "seed": args.seed, "limit": args.limit, "samples": args.samples,
        "test_items": len(test.task.items), "width": WIDTH, "successors": SUCCESSORS, "n": N,
        "chunk_len": chunk_len, "beta": beta,
        "dev": {"cbs_gold_reward_by_chunk_len": dev_cbs_scores,
                "eft_gold_reward_by_beta": dev_eft_scores, "samples": args.dev_samples},
        "notes": notes,
    }  # fmt: skip
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(
        {"scores": scores, "intervals": intervals, "summary": summary, "curve": curve,
         "examples": examples, "setup": setup}, indent=1) + "\n")  # fmt: skip
    (out / "search.md").write_text(markdown(scores, intervals, summary, curve, examples, setup))
    plot_curve(curve, out / "search.png")
    print(json.dumps(summary, indent=1))
    return summary


def claims(scores: dict, intervals: dict) -> dict:
    """The issue's checks, from the test scores."""
    g = {r: s["gold_reward"] for r, s in scores.items()}
    iv = {r: i["gold_reward"] for r, i in intervals.items()}
    out = {
        "cbs_gt_bon_gt_unguided": {
            "holds": g["cbs"] > g["bon"] > g["unguided"],
            "gold_reward": {r: g[r] for r in ("cbs", "bon", "unguided")},
            "intervals_apart": {
                "cbs_bon": iv["cbs"][0] > iv["bon"][1],
                "bon_unguided": iv["bon"][0] > iv["unguided"][1],
            },
        },
        "equal_strong_tokens_cbs_bon": {
            "ratio": round(scores["cbs"]["strong_tokens"] / scores["bon"]["strong_tokens"], 3)
        },
        "guided_strong_beats_guides_alone": {
            "holds": scores["cbs"]["reward_x_quality"] > scores["guides_alone"]["reward_x_quality"],
            "reward_x_quality": {r: scores[r]["reward_x_quality"] for r in ("cbs", "guides_alone")},
        },
        "eft": {"gold_reward": g["eft"], "reward_x_quality": scores["eft"]["reward_x_quality"]},
    }
    if "cbs_blackbox" in g:
        out["blackbox_same_ranking"] = {
            "holds": g["cbs_blackbox"] > g["bon_blackbox"] > g["unguided_blackbox"],
            "gold_reward": {r: g[r] for r in ("cbs_blackbox", "bon_blackbox", "unguided_blackbox")},
        }
    return out


def markdown(scores, intervals, summary, curve, examples, setup) -> str:
    lines = [
        "# Weak-to-strong search on the zoo (test split)", "",
        f"Reproduce: `{setup['command']}` ({setup['seconds']:.0f} s). Proposer `{PROPOSER}` "
        f"(frozen), guides `{TUNED}` / `{UNTUNED}`; the review openings of the sentiment task, "
        f"{setup['test_items']} test items x {setup['samples']} samples, seeds from the item. "
        f"CBS W={setup['width']}, K={setup['successors']}, L={setup['chunk_len']} and EFT "
        f"beta={setup['beta']} were chosen on the dev split (gold reward). Scores 0-100 with 95% "
        "percentile-bootstrap intervals over the test items; `strong tokens` is the large-model "
        "tokens sampled per response.", "",
        "| policy | " + " | ".join(METRICS) + " | strong tokens |",
        "|---|" + "---|" * (len(METRICS) + 1),
    ]  # fmt: skip
    for row, s in scores.items():
        cells = [f"{s[m]:.1f} ({intervals[row][m][0]:.1f}-{intervals[row][m][1]:.1f})"
                 for m in METRICS]  # fmt: skip
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {s['strong_tokens']:.1f} |")
    lines += ["", "## What must hold", "", "| claim | holds | detail |", "|---|---|---|"]
    for name, c in summary.items():
        detail = json.dumps({k: v for k, v in c.items() if k != "holds"})
        holds = "" if "holds" not in c else ("yes" if c["holds"] else "NO")
        lines.append(f"| {name} | {holds} | `{detail}` |")
    lines += ["", "## Gold reward against strong tokens (search.png)", "",
              "| configuration | strong tokens | gold reward |", "|---|---:|---|"]  # fmt: skip
    for name, c in curve.items():
        lo, hi = c["interval"]
        lines.append(
            f"| {name} | {c['strong_tokens']:.1f} | {c['gold_reward']:.1f} ({lo:.1f}-{hi:.1f}) |"
        )
    lines += ["", "## Dev choices", "", f"`{json.dumps(setup['dev'])}`", "",
              "## One answer per row (first test item, first sample)", ""]  # fmt: skip
    lines += [f"- {row}: `{text}`" for row, text in examples.items()]
    for note in setup.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot_curve(curve: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bon = [(c["strong_tokens"], c["gold_reward"], c["interval"]) for n, c in curve.items()
           if n.startswith("bon")]  # fmt: skip
    xs, ys, ivs = zip(*sorted(bon), strict=True)
    err = [
        [y - i[0] for y, i in zip(ys, ivs, strict=True)],
        [i[1] - y for y, i in zip(ys, ivs, strict=True)],
    ]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label="BoN (N = 1..16)")
    for name, c in curve.items():
        if name.startswith("cbs"):
            lo, hi = c["interval"]
            ax.errorbar([c["strong_tokens"]], [c["gold_reward"]], capsize=3, marker="s",
                        yerr=[[c["gold_reward"] - lo], [hi - c["gold_reward"]]],
                        label=name)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("strong tokens sampled per response")
    ax.set_ylabel("gold reward (0-100)")
    ax.set_title("Weak-to-strong search on the zoo (test split, 95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results"), help="where results go")
    p.add_argument("--zoo-dir", help="read the zoo from a build directory")
    p.add_argument("--limit", type=int, help="first N items of each split (smoke runs)")
    p.add_argument("--samples", type=int, default=SAMPLES, help="generations per test item")
    p.add_argument("--dev-samples", type=int, default=4, help="generations per dev item")
    p.add_argument("--no-blackbox", dest="blackbox", action="store_false",
                   help="skip the rows through a completions endpoint (no Ray needed)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
