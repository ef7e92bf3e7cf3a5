"""The Switch Generation experiment on the zoo, end to end: rollouts on dev, switcher
training, router training, then every policy on the test split through the evaluation
harness; writes results/switch.json, results/switch.md and results/switch.png (every score
with its 95% bootstrap interval over the test items).

    python -m antiphon.experiments.switch --limit 20 --prefixes 4 --k 4 --rounds 1 --epochs 3 --ship
                                                              # the committed results
    python -m antiphon.experiments.switch --zoo-dir zoo-build --limit 4 --k 2   # smoke

Ensemble: the zoo's base, sft and aligned (the paper's P, F, A) and its arithmetic expert
(`SWITCH_ENSEMBLE`), segments of `--segment-len`.
Choices beyond the paper (each can be turned off): prefix 0 of every query is empty, so the
first decision is labelled too; the compositional tasks' rollouts are scored by prefix
credit (random completions almost never write their exact sentence); a branch's utility is
the task's own metric over its k completions (validity x diversity for creativity); round
r > 1 cuts its prefixes from responses of round r-1's switcher (states the switcher reaches)
and, with --on-policy (the default), completes the branches with that switcher too, so a
branch is labelled by what follows under the switcher's own continuation, not a random one.
Labels (`--labels`): by default the exact-answer tasks (one right sentence) are labelled by
the oracle switch's own path on every dev item (`antiphon.training.oracle_labels`: at each
state the oracle passes, which candidates' greedy segment keeps the answer right), and only
creativity and calibration by rollouts; `--labels rollouts` labels every task by rollouts,
the paper's recipe, which on the zoo's exact answers leaves most examples tied (results/
switch.md names what each gave). `--dagger-rounds d` then runs DAgger over that oracle d
times: the switcher answers the same dev items greedily through the coordinator, every state
on its answer up to its first wrong segment is labelled by the oracle with the switcher's own
writers in the trace, and the switcher is fine-tuned (`--dagger-epochs`) on all examples.
Policies compared (same coordinator, same engines, same seeds): each model alone (`fixed`),
`random_switch`, `trained_router`, logit fusion (`antiphon.policies.fusion`) and `switch`
(trained). The untrained switcher (sft prompted) is no longer run: it scored 1.0 on average in
the run before this one, and its seven minutes would put the experiment over its hour.
Everything runs in this process over in-process engines: on two cores a Ray hop per turn
would only add time, and the code path is the coordinator's either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from antiphon.actors.engine import ModelEngine
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.experiments.train_switcher import (
    add_rollout_arguments,
    rollout_config,
    rollout_queries,
    train_config,
    zoo_model_path,
)
from antiphon.policies.fusion import FusionGenerator
from antiphon.training.oracle_labels import (
    OracleQuery,
    label_by_oracle,
    label_switcher_paths,
    reference_query,
)
from antiphon.training.rollouts import RolloutStore, run_rollouts
from antiphon.training.router_training import single_model_outcomes, train_router
from antiphon.training.switcher_training import train_switcher
from antiphon.zoo.evaluate import (
    EvalResult,
    SessionGenerator,
    plot,
    run_task,
    score_interval,
    zoo_tasks,
)
from antiphon.zoo.tasks import (
    COMPOSITIONAL_TASKS,
    CORE_TASKS,
    EXACT_TASKS,
    HELD_OUT_TASKS,
    SWITCH_ENSEMBLE,
)

ENSEMBLE = SWITCH_ENSEMBLE


def oracle_queries(dev: dict, args: argparse.Namespace) -> list[OracleQuery]:
    """The dev items (`--oracle-limit` per task, default all) of the exact-answer tasks."""
    return [
        reference_query(f"{name}:{i}", name, item.prompt, item.reference,
                        partial(task.verify, item), task.max_new_tokens)
        for name, task in dev.items() if name in EXACT_TASKS
        for i, item in enumerate(task.items[: args.oracle_limit])
    ]  # fmt: skip


async def oracle_labels(engines: dict, queries: list[OracleQuery], args) -> list:
    """Oracle-path examples of the queries, kept in `work/oracle-labels` (a rerun reads them
    back instead of labelling again)."""
    store = RolloutStore(args.work / "oracle-labels")
    if store.finished:
        return store.examples()
    writers = {n: SessionGenerator(e).segment for n, e in engines.items()}
    examples = await label_by_oracle(queries, writers, segment_len=args.segment_len)
    store.write_all(examples, {"labels": "oracle", "segment_len": args.segment_len,
                               "queries": len(queries), "examples": len(examples),
                               "informative": sum(e.informative for e in examples)})  # fmt: skip
    print(f"[switch] oracle labels: {len(examples)} examples from {len(queries)} dev items")
    return examples


async def switcher_path_labels(
    coord: Coordinator, engines: dict, queries: list[OracleQuery], switcher: Path, args, store
) -> list:
    """DAgger's new examples: the states `switcher` passes on its own greedy answers to the
    queries (through the coordinator, as the test evaluation runs it), labelled as the oracle
    labels its own (`label_switcher_paths`), kept in `store`."""
    if store.finished:
        return store.examples()
    limit = asyncio.Semaphore(16)
    params = {"switcher_path": str(switcher), "segment_len": args.segment_len}

    async def path(q: OracleQuery) -> list[tuple[int, str]]:
        async with limit:
            result = await coord.generate(GenerationRequest(
                prompt=q.prompt, models=ENSEMBLE, policy="switch", policy_params=params,
                max_tokens=q.max_tokens, temperature=0.0, seed=args.seed))  # fmt: skip
        return [(ENSEMBLE.index(s.model), s.text) for s in result.segments]

    paths = await asyncio.gather(*(path(q) for q in queries))
    writers = {n: SessionGenerator(e).segment for n, e in engines.items()}
    examples = await label_switcher_paths(queries, writers, paths, segment_len=args.segment_len)
    solved: dict[str, int] = {}  # dev items the switcher answered right, per task
    for q, p in zip(queries, paths, strict=True):
        solved[q.task] = solved.get(q.task, 0) + q.solved("".join(t for _, t in p))
    store.write_all(examples, {"labels": "switcher-path", "switcher": str(switcher),
                               "queries": len(queries), "solved": solved,
                               "examples": len(examples)})  # fmt: skip
    print(f"[switch] switcher paths: {sum(solved.values())}/{len(queries)} dev items solved "
          f"{solved}, {len(examples)} examples")  # fmt: skip
    return examples


def coordinator_generate(coord: Coordinator, policy: str, params: dict):
    """The harness's generate(prompt, sampling) -> text, through the coordinator."""

    async def generate(prompt, sampling) -> str:
        result = await coord.generate(
            GenerationRequest(
                prompt=prompt,
                models=ENSEMBLE,
                policy=policy,
                policy_params=params,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                seed=sampling.seed,
            )  # fmt: skip
        )
        return result.text

    return generate


async def evaluate_policies(generators: dict, tasks: dict, seed: int) -> dict:
    """{policy: {task: (score, per-item mean verified score, 95% interval of the score)}}."""
    out: dict[str, dict[str, tuple[float, list[float], tuple[float, float]]]] = {}
    for name, generate in generators.items():
        out[name] = {}
        start = time.time()
        for task in tasks.values():
            outputs = await run_task(generate, task, seed=seed, concurrency=16)
            per_item = [sum(task.verify(it, o) for o in outs) / len(outs)
                        for it, outs in zip(task.items, outputs, strict=True)]  # fmt: skip
            interval = score_interval(task, outputs, key=f"{name}:{task.name}")
            score = round(task.score(task.items, outputs), 2)
            out[name][task.name] = (score, per_item, interval)
        print(f"[switch] evaluated {name} in {time.time() - start:.0f} s: "
              f"{ {t: s for t, (s, *_) in out[name].items()} }", flush=True)  # fmt: skip
    return out


def claims(scores: dict, singles: Sequence[str], oracle: dict[str, float] | None = None) -> dict:
    """The issue's checks, from the test scores (`oracle`: the zoo's oracle switch per task,
    from results/zoo.json, where measured)."""

    def score(p: str, t: str) -> float:
        return scores[p][t][0]

    tasks = list(next(iter(scores.values())))
    mean = {p: sum(score(p, t) for t in tasks) / len(tasks) for p in scores}
    best_single = {t: max(score(s, t) for s in singles) for t in tasks}
    core = [t for t in tasks if t in CORE_TASKS]
    comp = [t for t in tasks if t in COMPOSITIONAL_TASKS]
    held_out = [t for t in tasks if t in HELD_OUT_TASKS]
    out = {"mean": {p: round(m, 2) for p, m in mean.items()}}
    if "switch" in scores:
        beats = {t: score("switch", t) > best_single[t] for t in tasks}
        solved, failed_by_all = 0, 0
        for t in tasks:
            for i, s in enumerate(scores["switch"][t][1]):
                if all(scores[m][t][1][i] == 0 for m in singles):
                    failed_by_all += 1
                    solved += s > 0
        gap = {t: round(oracle[t] - score("switch", t), 2) for t in comp if t in (oracle or {})}
        out.update({
            "switch_beats_best_single": beats,
            "core_tasks_won": f"{sum(beats[t] for t in core)}/{len(core)} (need >= 5 of 6)",
            "all_compositional_won": all(beats[t] for t in comp),
            "held_out_won": all(beats[t] for t in held_out) if held_out else None,
            "compositional_oracle_minus_switch": gap,
            "compositional_within_15_of_oracle": bool(gap) and all(g <= 15 for g in gap.values()),
            "switch_minus_random": round(mean["switch"] - mean["random_switch"], 2),
            "switch_beats_router": mean["switch"] > mean["trained_router"],
            "switch_beats_fusion": mean["switch"] > mean["logit_fusion"],
            "questions_every_single_fails": failed_by_all,
            "of_those_switch_solves": solved,
            "share_switch_solves_pct": round(100.0 * solved / max(1, failed_by_all), 1),
        })  # fmt: skip
    return out


def markdown(scores: dict, summary: dict, setup: dict) -> str:
    tasks = list(next(iter(scores.values())))
    lines = ["# Switch Generation on the zoo (test split)", "",
             f"Setup: `{json.dumps(setup)}`", "",
             "| policy | " + " | ".join(tasks) + " | mean |",
             "|---|" + "---:|" * (len(tasks) + 1)]  # fmt: skip
    for p, row in scores.items():
        cells = " | ".join(f"{row[t][0]:.1f}" for t in tasks)
        lines.append(f"| {p} | {cells} | {summary['mean'][p]:.1f} |")
    lines += [
        "",
        "95% intervals (percentile bootstrap over the test items, 1000 resamples, each scored "
        "by the task's own metric):",
        "",
        "| policy | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for p, row in scores.items():
        cells = " | ".join(f"{row[t][2][0]:.1f}-{row[t][2][1]:.1f}" for t in tasks)
        lines.append(f"| {p} | {cells} |")
    lines += ["", "```", json.dumps({k: v for k, v in summary.items() if k != "mean"}, indent=2),
              "```", ""]  # fmt: skip
    return "\n".join(lines)


def zoo_oracle(path: Path) -> dict[str, float]:
    """The oracle switch's test score per task, as `antiphon.zoo.measure` wrote it."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["results"]
    return {r["task"]: r["score"] for r in rows if r["policy"] == "oracle-switch"}


class PhaseClock:
    """Seconds per phase of a run: each `end(name)` records the time since the previous end (or
    the start), so no second falls between two phases."""

    def __init__(self, start: float) -> None:
        self.seconds: dict[str, int] = {}
        self._mark = start

    def end(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self._mark)
        self._mark = now


async def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    phases = PhaseClock(t0)  # seconds per phase, for the budget
    train_cfg = train_config(args)  # a bad training option fails now, not after the labels
    paths = {n: zoo_model_path(n, args.zoo_dir) for n in ENSEMBLE}
    # Rollouts hold 1 + n x k sessions per item in flight: room for all of them.
    engines = {
        n: ModelEngine(ModelSpec(name=n, path=p, max_sessions=1024)) for n, p in paths.items()
    }
    tokenizers = {n: load_tokenizer(p) for n, p in paths.items()}
    coord = Coordinator(engines, tokenizers)
    # The held-out family is only ever tested: no rollout, switcher or router sees it.
    trained_on = list(CORE_TASKS + COMPOSITIONAL_TASKS)
    dev = zoo_tasks("dev", trained_on, args.zoo_dir)
    test = zoo_tasks("test", trained_on + list(HELD_OUT_TASKS), args.zoo_dir)
    work = args.work
    queries = rollout_queries(dev, args)
    # With --labels oracle the exact-answer tasks are labelled by the oracle's path on every
    # dev item (`antiphon.training.oracle_labels`); rollouts label only the others.
    exact = oracle_queries(dev, args) if args.labels == "oracle" else []
    oracle_examples = await oracle_labels(engines, exact, args) if exact else []
    phases.end("oracle_labels")
    labelled = [q for q in queries if not (oracle_examples and q.task in EXACT_TASKS)]

    # 1-2. rollouts on dev and the switcher trained on them; round r > 1 cuts its prefixes from
    # responses of round r-1's switcher and trains on every round's examples
    init = zoo_model_path("sft", args.zoo_dir)
    examples: list = list(oracle_examples)
    reports = []
    switcher = trained = None
    for r in range(1, args.rounds + 1):
        cfg = rollout_config(args)
        if r > 1:
            previous = {"switcher_path": str(switcher), "selection": "top_p", "top_p": 0.9}
            cfg = replace(cfg, prefix_policy="switch", prefix_policy_params=previous,
                          completion_switcher=previous if args.on_policy else None)  # fmt: skip
        store = RolloutStore(work / ("rollouts" if r == 1 else f"rollouts-r{r}"))
        examples += await run_rollouts(coord.generate, labelled, ENSEMBLE, cfg, store,
                                       {"ensemble": paths, "round": r})  # fmt: skip
        phases.end(f"rollouts_r{r}")
        switcher = work / ("switcher" if r == args.rounds else f"switcher-r{r}")
        try:
            report = asdict(train_switcher(examples, init, switcher, train_cfg))
            report.pop("losses")
        except ValueError as e:  # no informative example: nothing to train on
            reports.append({"round": r, "error": str(e)})
            break
        finally:
            phases.end(f"training_r{r}")
        trained = switcher
        reports.append({"round": r, "examples": len(examples), **report})
    # 2b. DAgger over the oracle: the switcher's own states on the exact tasks' dev items,
    # labelled by the oracle, and the switcher fine-tuned on every example so far
    for d in range(1, (args.dagger_rounds if exact and trained else 0) + 1):
        store = RolloutStore(work / f"switcher-paths-d{d}")
        examples += await switcher_path_labels(coord, engines, exact, trained, args, store)
        phases.end(f"switcher_paths_d{d}")
        switcher = work / f"switcher-d{d}"
        cfg = replace(train_cfg, epochs=args.dagger_epochs)
        report = asdict(train_switcher(examples, str(trained), switcher, cfg))
        report.pop("losses")
        phases.end(f"training_d{d}")
        trained = switcher
        reports.append({"dagger_round": d, "examples": len(examples), **report})
    # 3. the router, from each model alone on the dev queries
    outcomes = await single_model_outcomes(coord.generate, queries, ENSEMBLE, seed=args.seed)
    router_report = train_router(outcomes, ENSEMBLE, work / "router")
    phases.end("router")

    # 4. every policy on test
    seg = {"segment_len": args.segment_len}
    gens = {f"single:{m}": coordinator_generate(coord, "fixed", {"model": m, **seg})
            for m in ENSEMBLE}  # fmt: skip
    gens["random_switch"] = coordinator_generate(coord, "random_switch", seg)
    gens["trained_router"] = coordinator_generate(
        coord, "trained_router", {"weights": str(work / "router"), **seg}
    )
    gens["logit_fusion"] = FusionGenerator(engines, tokenizers[ENSEMBLE[0]])
    if trained is not None:
        gens["switch"] = coordinator_generate(
            coord, "switch", {"switcher_path": str(trained), **seg}
        )
    test_tasks = {n: t for n, t in test.items()}
    if args.test_limit:
        test_tasks = {n: replace(t, items=t.items[: args.test_limit]) for n, t in test.items()}
    scores = await evaluate_policies(gens, test_tasks, args.seed)
    phases.end("test_evaluation")
    for e in engines.values():
        await e.shutdown()

    singles = [f"single:{m}" for m in ENSEMBLE]
    summary = claims(scores, singles, zoo_oracle(args.results / "zoo.json"))
    setup = {"ensemble": paths, "segment_len": args.segment_len, "k": args.k,
             "prefixes": args.prefixes, "empty_first_prefix": args.empty_first_prefix,
             "rounds": args.rounds, "on_policy": args.on_policy,
             "dense_reward": args.dense_reward, "labels": args.labels,
             "oracle_limit": args.oracle_limit, "dagger_rounds": args.dagger_rounds,
             "dagger_epochs": args.dagger_epochs, "epochs": args.epochs,
             "lr_schedule": args.lr_schedule, "warmup_ratio": args.warmup_ratio,
             "dev_limit": args.limit, "test_limit": args.test_limit,
             "seed": args.seed, "seconds": round(time.time() - t0)}  # fmt: skip
    results = {
        "setup": setup,
        "phase_seconds": phases.seconds,
        "scores": {p: {t: s for t, (s, *_) in row.items()} for p, row in scores.items()},
        "intervals": {p: {t: list(c[2]) for t, c in row.items()} for p, row in scores.items()},
        "summary": summary,
        "switcher": str(trained) if trained is not None else None,  # the one tested
        "switcher_training": reports,
        "router_training": router_report,
        "rollouts": {
            "examples": len(examples),
            "informative": sum(e.informative for e in examples),
            "oracle_path_examples": len(oracle_examples),
            "oracle_path_informative": sum(e.informative for e in oracle_examples),
            "rounds": args.rounds,
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "switch.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.results / "switch.md").write_text(markdown(scores, summary, setup))
    plot(
        [
            EvalResult(policy=p, ensemble="+".join(ENSEMBLE), task=t, score=c[0], interval=c[2])
            for p, row in scores.items()
            for t, c in row.items()
        ],
        args.results / "switch.png",
    )
    print(markdown(scores, summary, setup))
    if args.ship and trained is not None:
        demo = demo_question(scores, test_tasks, singles)
        print(f"[switch] shipped the switcher to {ship_switcher(trained, demo, setup)}")
    return results


def demo_question(scores: dict, tasks: dict, singles: Sequence[str]) -> dict | None:
    """The first test question (compositional tasks first) that every single model gets
    wrong and `switch` gets right: what `antiphon demo` asks."""
    order = [*COMPOSITIONAL_TASKS, *HELD_OUT_TASKS, *CORE_TASKS]
    for name in [t for t in order if t in tasks and tasks[t].samples == 1]:
        for i, solved in enumerate(scores["switch"][name][1]):
            if solved == 1.0 and all(scores[m][name][1][i] == 0 for m in singles):
                item = tasks[name].items[i]
                return {"task": name, "prompt": item.prompt, "reference": item.reference,
                        "max_tokens": tasks[name].max_new_tokens}  # fmt: skip
    return None


def ship_switcher(trained: Path, demo: dict | None, setup: dict) -> Path:
    """Copy the trained switcher into the package as `zoo:switcher`, with the question the
    demo asks and the setup it was trained with."""
    from antiphon.checkpoint import ZOO_DIR

    dest = ZOO_DIR / "switcher"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(trained, dest)
    card = {"ensemble": list(ENSEMBLE), "segment_len": setup["segment_len"], "demo": demo}
    (dest / "antiphon_switcher.json").write_text(json.dumps(card, indent=2) + "\n")
    return dest


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zoo-dir", type=Path, default=None, help="zoo build dir (default: package)")
    p.add_argument("--work", type=Path, default=Path("runs/switch"), help="rollouts, weights")
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--test-limit", type=int, default=None, help="test items per task")
    add_rollout_arguments(p)
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rollout rounds; round r > 1 cuts prefixes from round r-1's switcher",
    )
    p.add_argument(
        "--on-policy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="round r > 1 also completes the branches with round r-1's switcher (top-p 0.9)",
    )
    p.add_argument(
        "--labels",
        choices=("oracle", "rollouts"),
        default="oracle",
        help="oracle: exact-answer tasks labelled by the oracle switch's path, the rest by "
        "rollouts; rollouts: every task by rollouts (the paper)",
    )
    p.add_argument(
        "--oracle-limit", type=int, default=None, help="dev items per task the oracle labels"
    )
    p.add_argument("--dagger-rounds", type=int, default=0,
                   help="after the rounds: label the switcher's own dev paths by the oracle and "
                   "fine-tune it on every example, this many times")  # fmt: skip
    p.add_argument("--dagger-epochs", type=int, default=1, help="epochs of each DAgger round")
    p.add_argument("--ship", action="store_true", help="copy the switcher into the zoo")
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
