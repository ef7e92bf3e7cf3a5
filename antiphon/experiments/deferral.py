"""The Co-LLM deferral experiment on the zoo, end to end: the gates of `sft` deferring to
`strong` trained on the dev split (`antiphon train gate`: weak labels, then the marginal
likelihood, alone and with the base; eta chosen on held-back dev items), then every policy on
the test split; writes results/deferral.json, .md and .png (every score with its 95%
bootstrap interval).

    python -m antiphon.experiments.deferral                        # the committed results
    python -m antiphon.experiments.deferral --limit 6 --no-joint   # smoke

The pair: `sft` (the tuned base: the Q/A form, refusals) and `strong` (the larger pretrained
model: the facts of the entities no tuned model saw). Rows, same coordinator, same engines,
same per-item seeds: `base` and `assistant` (each alone), `random_deferral` (deferral blind
to the content, at co_llm's test deferral rate), `weak_label_gate` (the initialisation gate,
its own eta), `co_llm` (the marginal-likelihood gate), `co_llm_joint` (the gate and the base
trained together; --no-joint skips it), `joint_base_alone` (that trained base writing alone:
what its training taught it, without deferring) and `proxy_tuning` (logit arithmetic
strong + sft - base; the vocabularies match). The tasks: the zoo's exact-answer tasks; those
whose answers hold facts of held-out entities are where the assistant helps (`HELPED_TASKS`,
fixed before any run), the others (arithmetic, safety) are where it must not hurt.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

from antiphon.actors.engine import ModelEngine
from antiphon.checkpoint import load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.policies.fusion import FusionGenerator
from antiphon.training.gate_pipeline import CARD_FILE, GatePairConfig, train_gate_pair
from antiphon.training.policy_runs import Written, annotate, run_policy, texts, token_share
from antiphon.zoo.evaluate import EvalResult, plot, run_task, score_interval, zoo_tasks
from antiphon.zoo.tasks import EXACT_TASKS, Task

BASE, ASSISTANT, UNTUNED = "sft", "strong", "base"
HELPED_TASKS = ("qa-knowledge", "qa-format", "qa-fact-sum", "qa-fact-refusal", "qa-two-entities")
ROWS = ("base", "assistant", "random_deferral", "weak_label_gate", "co_llm", "co_llm_joint",
        "joint_base_alone", "proxy_tuning")  # fmt: skip
ANNOTATED_PER_TASK = 2


def engines_for(gates: dict[str, str], zoo: str) -> dict[str, ModelEngine]:
    """sft without a gate, sft with each gate, strong, and base (proxy tuning's untuned)."""
    path = lambda name: f"{zoo}{name}"  # noqa: E731
    engines = {BASE: ModelEngine(ModelSpec(name=BASE, path=path(BASE)))}
    for row, gate in gates.items():
        spec = (ModelSpec(name=row, path=gate) if row == "co_llm_joint"
                else ModelSpec(name=row, path=path(BASE), gate_path=gate))  # fmt: skip
        engines[row] = ModelEngine(spec)
    for name in (ASSISTANT, UNTUNED):
        engines[name] = ModelEngine(ModelSpec(name=name, path=path(name)))
    return engines


async def run_row(
    coord: Coordinator, base: str, policy: str, params: dict, tasks: dict[str, Task], seed: int
) -> dict[str, list[list[Written]]]:
    """Every task's runs of one policy over (base, the assistant)."""
    return {n: await run_policy(coord, (base, ASSISTANT), policy, params, t, seed=seed)
            for n, t in tasks.items()}  # fmt: skip


async def run_proxy_tuning(engines, tokenizer, tasks, seed) -> dict[str, list[list[Written]]]:
    fused = FusionGenerator(
        {ASSISTANT: engines[ASSISTANT], BASE: engines[BASE], UNTUNED: engines[UNTUNED]},
        tokenizer, coefficients=(1.0, 1.0, -1.0),
    )  # fmt: skip
    out = {}
    for name, task in tasks.items():
        outputs = await run_task(fused, task, seed=seed, concurrency=16)
        out[name] = [[Written(o, ()) for o in outs] for outs in outputs]
    return out


def row_results(row: str, runs: dict[str, list[list[Written]]], tasks: dict) -> list[EvalResult]:
    out = []
    for name, task in tasks.items():
        outputs = texts(runs[name])
        out.append(EvalResult(
            policy=row, ensemble=f"{BASE}+{ASSISTANT}", task=name, split=task.split,
            n=len(task.items), score=round(task.score(task.items, outputs), 2),
            interval=score_interval(task, outputs, key=f"deferral:{row}:{name}"),
        ))  # fmt: skip
    return out


def claims(scores: dict, intervals: dict, rates: dict) -> dict:
    """The issue's checks, from the test scores, for each learned gate (co_llm, and
    co_llm_joint where it ran)."""
    tasks = list(scores["co_llm"])
    helped = [t for t in tasks if t in HELPED_TASKS]
    elsewhere = [t for t in tasks if t not in HELPED_TASKS]
    mean = {r: round(sum(s.values()) / len(s), 2) for r, s in scores.items()}
    out: dict = {}
    for row in ("co_llm", "co_llm_joint"):
        if row not in scores:
            continue
        co = scores[row]
        both = [t for t in helped if co[t] > scores["base"][t] and co[t] > scores["assistant"][t]]
        worse = {t: {r: scores[r][t] for r in ("base", "assistant")
                     if scores[r][t] > intervals[row][t][1]} for t in elsewhere}  # fmt: skip
        out[f"{row}_beats_both_alone"] = {"holds": len(both) >= 2, "tasks": both}
        out[f"{row}_loses_by_no_more_than_its_interval_elsewhere"] = {
            "holds": not any(worse.values()), "beyond_interval": worse}  # fmt: skip
        out[f"{row}_beats_random_deferral"] = {
            "holds": all(co[t] > scores["random_deferral"][t] for t in helped),
            "per_task": {t: [co[t], scores["random_deferral"][t]] for t in helped}}  # fmt: skip
    out["marginal_beats_weak_label_on_average"] = {
        "holds": mean["co_llm"] > mean["weak_label_gate"],
        "means": {r: mean[r] for r in ("co_llm", "weak_label_gate")}}  # fmt: skip
    if "joint_base_alone" in scores:
        out["deferring_adds_to_the_joint_base"] = {
            "per_task": {t: round(scores["co_llm_joint"][t] - scores["joint_base_alone"][t], 2)
                         for t in tasks}}  # fmt: skip
    out["mean"] = mean
    out["deferral_rate"] = rates
    return out


def markdown(scores, intervals, rates, summary, annotated, setup) -> str:
    tasks = list(next(iter(scores.values())))
    head = "| policy | deferral rate | " + " | ".join(tasks) + " | mean |"
    lines = [
        "# Co-LLM deferral on the zoo (test split)", "",
        f"Reproduce: `{setup['command']}` ({setup['seconds']:.0f} s). Base `{BASE}`, assistant "
        f"`{ASSISTANT}`; gates trained on the dev split, eta chosen on held-back dev items "
        f"(eta: {', '.join(f'{r} {e:.6g}' for r, e in setup['eta'].items())}). "
        "Scores 0-100 with 95% percentile-bootstrap intervals over the test items; the deferral "
        "rate is the share of response tokens the assistant wrote.", "",
        head, "|" + "---|" * (len(tasks) + 3),
    ]  # fmt: skip
    for row, s in scores.items():
        rate = "" if rates.get(row) is None else f"{100 * rates[row]:.1f}%"
        cells = [
            f"{s[t]:.1f} ({intervals[row][t][0]:.1f}-{intervals[row][t][1]:.1f})" for t in tasks
        ]
        lines.append(
            f"| {row} | {rate} | " + " | ".join(cells) + f" | {summary['mean'][row]:.1f} |"
        )
    lines += ["", "## What must hold", "", "| claim | holds | detail |", "|---|---|---|"]
    for name, c in summary.items():
        if name in ("mean", "deferral_rate"):
            continue
        detail = json.dumps({k: v for k, v in c.items() if k != "holds"})
        holds = "" if "holds" not in c else ("yes" if c["holds"] else "NO")
        lines.append(f"| {name} | {holds} | `{detail}` |")
    lines += ["", "## Where it defers", ""]
    for row, by_task in annotated.items():
        lines += [f"{row}'s answers on test items, the assistant's tokens in [[ ]]:", ""]
        for task, answers in by_task.items():
            lines += [f"- {task}: `{a}`" for a in answers]
        lines.append("")
    for note in setup.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


async def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    zoo = f"{args.zoo_dir}/" if args.zoo_dir else "zoo:"
    gate_dir = args.runs / f"{BASE}+{ASSISTANT}"
    if not (args.reuse and (gate_dir / CARD_FILE).is_file()):
        smoke = {"tasks": tuple(args.gate_tasks)} if args.gate_tasks else {}
        if args.rates:
            smoke["rates"] = tuple(args.rates)
        await train_gate_pair(GatePairConfig(
            base=f"{zoo}{BASE}", assistant=f"{zoo}{ASSISTANT}", out=gate_dir,
            joint="full" if args.joint else "none", seed=args.seed, **smoke,
        ))  # fmt: skip
    card = json.loads((gate_dir / CARD_FILE).read_text())
    gates = {"co_llm": card["gates"]["marginal"], "weak_label_gate": card["gates"]["weak_label"]}
    if args.joint:
        gates["co_llm_joint"] = card["gates"]["joint"]
    files = {row: g["file"] if row != "co_llm_joint" else str(Path(g["file"]).parent)
             for row, g in gates.items()}  # fmt: skip
    engines = engines_for(files, zoo)
    tokenizer = load_tokenizer(f"{zoo}{BASE}")
    coord = Coordinator(engines, {n: tokenizer for n in engines})
    tasks = zoo_tasks("test", EXACT_TASKS)
    if args.limit:
        tasks = {n: dataclasses.replace(t, items=t.items[: args.limit]) for n, t in tasks.items()}
    runs: dict[str, dict] = {}
    try:
        for row, model in (("base", BASE), ("assistant", ASSISTANT)):
            runs[row] = await run_row(coord, BASE, "fixed", {"model": model}, tasks, args.seed)
        for row in gates:
            params = {"base": row, "assistant": ASSISTANT, "eta": gates[row]["eta"]}
            runs[row] = await run_row(coord, row, "defer", params, tasks, args.seed)
        if "co_llm_joint" in gates:  # the trained base alone: what deferring adds to it
            alone = {"model": "co_llm_joint"}
            runs["joint_base_alone"] = await run_row(coord, "co_llm_joint", "fixed", alone, tasks,
                                                     args.seed)  # fmt: skip
        rate = round(token_share([w for r in runs["co_llm"].values() for w in r], ASSISTANT), 4)
        params = {"base": BASE, "assistant": ASSISTANT, "rate": rate}
        runs["random_deferral"] = await run_row(coord, BASE, "random_defer", params, tasks,
                                                args.seed)  # fmt: skip
        runs["proxy_tuning"] = await run_proxy_tuning(engines, tokenizer, tasks, args.seed)
    finally:
        for e in engines.values():
            await e.shutdown()
    order = [r for r in ROWS if r in runs]
    results = [res for row in order for res in row_results(row, runs[row], tasks)]
    scores = {r: {x["task"]: x["score"] for x in results if x["policy"] == r} for r in order}
    intervals = {r: {x["task"]: x["interval"] for x in results if x["policy"] == r} for r in order}
    rates = {r: (None if r == "proxy_tuning" else round(token_share(
        [w for t in runs[r].values() for w in t], ASSISTANT), 4)) for r in order}  # fmt: skip
    summary = claims(scores, intervals, rates)
    annotated = {row: {t: [annotate(runs[row][t][i][0], ASSISTANT)
                           for i in range(min(ANNOTATED_PER_TASK, len(tasks[t].items)))]
                       for t in tasks} for row in gates if row != "weak_label_gate"}  # fmt: skip
    warnings = [f"WARNING {k}: {g['warning']}" for k, g in card["gates"].items() if g["warning"]]
    setup = {
        "command": f"python -m antiphon.experiments.deferral{'' if args.joint else ' --no-joint'}",
        "seconds": time.perf_counter() - t0, "seed": args.seed, "limit": args.limit,
        "eta": {r: g["eta"] for r, g in gates.items()}, "gate_card": card, "notes": warnings,
    }  # fmt: skip
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "deferral.json").write_text(json.dumps(
        {"scores": scores, "intervals": intervals, "deferral_rate": rates, "summary": summary,
         "annotated": annotated, "setup": setup, "results": results}, indent=1) + "\n")  # fmt: skip
    (out / "deferral.md").write_text(markdown(scores, intervals, rates, summary, annotated, setup))
    plot(results, out / "deferral.png")
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results"), help="where results go")
    p.add_argument("--runs", type=Path, default=Path("runs/deferral"),
                   help="where the gates are trained (default runs/deferral)")  # fmt: skip
    p.add_argument("--reuse", action="store_true", help="reuse gates trained by an earlier run")
    p.add_argument("--no-joint", dest="joint", action="store_false",
                   help="skip the gate trained with the base (quicker)")  # fmt: skip
    p.add_argument("--zoo-dir", help="read the zoo from a build directory")
    p.add_argument("--limit", type=int, help="first N test items per task (smoke runs)")
    p.add_argument("--gate-tasks", nargs="*", help="dev tasks the gates learn from (smoke runs)")
    p.add_argument("--rates", type=float, nargs="*", help="deferral rates swept (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
