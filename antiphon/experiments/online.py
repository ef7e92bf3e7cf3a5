"""The online learning experiment: a live app serves Switch Generation from an untrained
switcher, a client streams zoo dev queries and posts each answer's verifier score as its
reward, and the online trainer learns from the turn log and publishes what its promotion
gate passes, all without a restart. Writes results/online.{json,md,png}.

    python -m antiphon.experiments.online                     # the committed results
    python -m antiphon.experiments.online --rounds 2 --queries 12 --test-limit 2 \\
        --out /tmp/online                                     # a smoke run

The app: the zoo's base, sft, aligned and expert (`SWITCH_ENSEMBLE`), ensemble `switched`
with its switch policy hosted, its checkpoint the policy store's served link (HTTP ingress,
coordinator and model deployments on a local Ray). Each round:

1. the client asks `--queries` dev queries over HTTP (none of the dev items the gate judges
   on) and posts their rewards in query order, so that the log is joined the same way in
   every run; a share `--explore` of them is answered by one writer alone (`fixed`, the
   writer chosen by the item): the exploration the served switch (its most likely writer
   each turn) does not do, and what the trainer imitates when such an answer scores;
2. the trainer reads the log and makes a candidate from the round's examples (and its
   replay buffer), judged on the first `--dev-limit` dev items of each task through the
   app's coordinator; while it is published, requests keep flowing (no reward: they teach
   nothing) and every failure is counted;
3. the served switch is scored on the test split (the first `--test-limit` items of each
   task) over HTTP: a point of the learning curve.

The reference line is the offline-trained switcher the zoo ships (`zoo:switcher`) on the
same test items. Last, a trainer learning from the same log with its rewards inverted makes
one candidate, which the gate must refuse. Tasks: the zoo's core and compositional tasks
with one sample per item (creativity and calibration score sets of samples, not one
answer). Every sampling seed comes from the item, and rewards are posted in query order, so
a rerun gives the same table.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import tempfile
import time
import zlib
from pathlib import Path

from antiphon.zoo.tasks import COMPOSITIONAL_TASKS, CORE_TASKS, SWITCH_ENSEMBLE

APP = "antiphon-online"
ENSEMBLE_NAME = "switched"
TASKS = tuple(t for t in CORE_TASKS + COMPOSITIONAL_TASKS
              if t not in ("qa-creativity", "qa-calibration"))  # fmt: skip
RESULTS = Path("results")
BAD_EXAMPLES = 256  # the inverted trainer's one candidate: as many examples as a round's


def app_config(store_link: Path, work: Path, segment_len: int):
    from antiphon.deploy.config import parse_config

    return parse_config({
        "models": [{"name": m, "path": f"zoo:{m}"} for m in SWITCH_ENSEMBLE],
        "ensembles": [{"name": ENSEMBLE_NAME, "models": list(SWITCH_ENSEMBLE), "policy": {
            "name": "switch", "hosted": True,
            "params": {"switcher_path": str(store_link), **switch_params(segment_len)}}}],
        "serving": {"turn_log_path": str(work / "turns"), "max_concurrent_requests": 64},
    })  # fmt: skip


def switch_params(segment_len: int) -> dict:
    """The served switch, and the offline reference measured the same way: the switcher's
    most likely writer (as the switch experiment serves it). Tried first: sampling the
    writer from the switcher's distribution, to explore; a switcher spread over two good
    writers then alternates between them every segment, which breaks the answers, and
    every candidate scored below the untrained switcher. Exploration is the fixed-writer
    share of the dev queries instead (`behaviour`)."""
    return {"segment_len": segment_len}


def untrained_switcher(out: Path) -> Path:
    """The switcher's initial checkpoint, as the switch experiment's untuned one: the zoo's
    sft with the context of the shipped switcher."""
    from antiphon.checkpoint import resolve_checkpoint_path
    from antiphon.training.switcher_training import load_init

    shipped = json.loads(Path(resolve_checkpoint_path("zoo:switcher"), "config.json").read_text())
    model, tokenizer = load_init("zoo:sft", shipped["max_position_embeddings"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def item_reward(task, item, text: str) -> float:
    """The verifier's score of one answer, in [0, 1]."""
    return max(0.0, min(1.0, task.score([item], [[text]]) / 100.0))


def behaviour(task, i: int, explore: float, segment_len: int) -> tuple[str | None, dict | None]:
    """Who answers a dev query: the served switch (None), or, for a share `explore` of the
    queries (chosen by the item, so every run picks the same), one writer alone (`fixed`,
    the writer chosen by the item too): exploration the switcher learns from when it works."""
    h = zlib.crc32(f"explore:{task.name}:{i}".encode())
    if h / 2**32 >= explore:
        return None, None
    writer = SWITCH_ENSEMBLE[zlib.crc32(f"writer:{task.name}:{i}".encode()) % len(SWITCH_ENSEMBLE)]
    return "fixed", {"model": writer, "segment_len": segment_len}


async def ask(client, task, i: int, seed: int, policy=None, params=None):
    """One item asked over HTTP as the eval harness asks it: (request id, text)."""
    from antiphon.errors import retry_overloaded
    from antiphon.zoo.evaluate import sample_seed

    sampling = task.sampling(sample_seed(seed, task.name, i, 0))

    async def once():
        return await client.generate(
            task.items[i].prompt, ensemble=ENSEMBLE_NAME, policy=policy, policy_params=params,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            seed=sampling.seed, stop=list(sampling.stop_strings) or None,
        )  # fmt: skip

    answer = await retry_overloaded(once, 20)
    return answer.id, answer.text


async def gather_limited(calls, concurrency: int) -> list:
    """The results of the coroutine functions `calls`, in order, `concurrency` at a time;
    an exception is returned in its place (counted by the caller, never lost)."""
    limit = asyncio.Semaphore(concurrency)

    async def one(call):
        async with limit:
            try:
                return await call()
            except Exception as e:  # noqa: BLE001 (a failed request is a result here)
                return e

    return await asyncio.gather(*(one(c) for c in calls))


async def dev_round(client, queries, args) -> dict:
    """Ask the round's dev queries, then post their rewards in query order."""
    answers = await gather_limited(
        [lambda t=t, i=i: ask(client, t, i, args.seed,
                              *behaviour(t, i, args.explore, args.segment_len))
         for t, i in queries],
        args.concurrency,
    )  # fmt: skip
    failed = [a for a in answers if isinstance(a, Exception)]
    rewards = []
    for (task, i), answer in zip(queries, answers, strict=True):
        if isinstance(answer, Exception):
            continue
        request_id, text = answer
        reward = item_reward(task, task.items[i], text)
        await client.feedback(request_id, reward)
        rewards.append(reward)
    return {"asked": len(queries), "failed": len(failed), "rewarded": len(rewards),
            "mean_reward": round(sum(rewards) / max(1, len(rewards)), 4),
            "errors": [repr(e) for e in failed[:3]]}  # fmt: skip


def pooled_score(scores: list[float], key: str) -> dict:
    """100 x the mean per-item score, with its 95% bootstrap interval over the items."""
    from antiphon.zoo.evaluate import bootstrap_interval

    n = len(scores)
    mean = 100 * sum(scores) / n
    low, high = bootstrap_interval(n, lambda idx: 100 * sum(scores[i] for i in idx) / n, key)
    return {"score": round(mean, 2), "interval": [low, high], "n": n}


async def served_test_score(client, tests, seed: int, concurrency: int, key: str) -> dict:
    """The served switch on the test items, over HTTP."""
    items = [(t, i) for t in tests for i in range(len(t.items))]
    answers = await gather_limited(
        [lambda t=t, i=i: ask(client, t, i, seed) for t, i in items], concurrency
    )
    failed = sum(isinstance(a, Exception) for a in answers)
    scores = [0.0 if isinstance(a, Exception) else item_reward(t, t.items[i], a[1])
              for (t, i), a in zip(items, answers, strict=True)]  # fmt: skip
    return {**pooled_score(scores, key), "failed": failed}


def offline_test_score(tests, seed: int, segment_len: int) -> dict:
    """The shipped offline switcher on the same test items, through the app's coordinator
    (its checkpoint is not one a request may name over HTTP)."""
    from antiphon.experiments.train_online import serving_judge
    from antiphon.training.online_trainer import DevSlice

    judge = serving_judge(
        DevSlice(app=APP, models=list(SWITCH_ENSEMBLE), policy_params=switch_params(segment_len),
                 tasks=[t.name for t in tests], limit=len(tests[0].items), seed=seed),
        split="test",
    )  # fmt: skip
    return pooled_score([s / 100 for s in judge("zoo:switcher")], "offline")


class ProbeTraffic:
    """Requests in flight while a version is published (no reward: they teach nothing),
    so that a publication is measured under load; every failure is kept."""

    def __init__(self, url: str, prompt: str) -> None:
        import threading

        self.url, self.prompt = url, prompt
        self.sent = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProbeTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import httpx

        body = {"prompt": self.prompt, "ensemble": ENSEMBLE_NAME, "max_tokens": 24}
        while not self._stop.is_set():
            self.sent += 1
            try:
                r = httpx.post(f"{self.url}/v1/generate", json=body, timeout=120)
                ok = r.status_code == 200
                error = "" if ok else f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                ok, error = False, repr(e)
            if not ok:
                self.failed += 1
                self.errors.append(error)


def wait_for_rewards(trainer, expected: int, deadline_s: float = 300) -> None:
    """Poll until the trainer has joined `expected` rewards (records land just after the
    answers, from another process)."""
    deadline = time.monotonic() + deadline_s
    while trainer.joiner.counters.rewarded < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{trainer.joiner.counters.rewarded} of {expected} rewards logged")
        trainer.poll()
        time.sleep(0.5)


def run(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from antiphon.deploy.app import build_app, free_port, hosted_policy_actor_name
    from antiphon.experiments.train_online import serving_judge
    from antiphon.training.online_learners import SwitchLearner
    from antiphon.training.online_trainer import (
        DevSlice,
        OnlineTrainConfig,
        OnlineTrainer,
        actor_publisher,
    )
    from antiphon.zoo.evaluate import zoo_tasks

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="antiphon-online-"))
    dev_all = zoo_tasks("dev", TASKS)
    tests = [dataclasses.replace(t, items=t.items[: args.test_limit])
             for t in zoo_tasks("test", TASKS).values()]  # fmt: skip
    # the dev items the gate judges on are never streamed
    stream = [(t, i) for i in range(args.dev_limit, 54) for t in dev_all.values()
              if i < len(t.items)]  # fmt: skip
    dev = DevSlice(app=APP, models=list(SWITCH_ENSEMBLE), tasks=list(TASKS),
                   policy_params=switch_params(args.segment_len), limit=args.dev_limit,
                   seed=args.seed)  # fmt: skip
    config = OnlineTrainConfig(
        turn_log=str(work / "turns"), store=str(work / "store"), state_dir=str(work / "state"),
        init=str(untrained_switcher(work / "untrained")), examples_per_candidate=10**9,
        replay=args.replay, dev=dev, publish_to=hosted_policy_actor_name(ENSEMBLE_NAME),
        policies=["switch", "fixed"],
        train={"epochs": args.epochs, "lr": args.lr, "batch_size": 16},
    )  # fmt: skip
    # a private local Ray: never a cluster this machine may be running already
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        judge = serving_judge(dev)
        # the store and its served link exist before the app reads the link
        trainer = OnlineTrainer(config, SwitchLearner(config.train), judge)
        serve.run(build_app(app_config(trainer.store.served_path, work, args.segment_len)),
                  name=APP, route_prefix="/")  # fmt: skip
        trainer.publish = actor_publisher(config.publish_to)
        url = f"http://127.0.0.1:{port}"
        report = asyncio.run(rounds(args, url, trainer, stream, tests))
        report["offline"] = offline_test_score(tests, args.seed, args.segment_len)
        report["bad_candidate"] = bad_candidate(config, judge, work)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


async def rounds(args, url: str, trainer, stream, tests) -> dict:
    from antiphon.client import AsyncClient

    curve, rounds_out, probe_sent, probe_failed, probe_errors = [], [], 0, 0, []
    async with AsyncClient(url, timeout=300) as client:
        first = await served_test_score(client, tests, args.seed, args.concurrency, "round-0")
        curve.append({"round": 0, "queries": 0, "version": trainer.served().version, **first})
        for r in range(1, args.rounds + 1):
            batch = stream[(r - 1) * args.queries : r * args.queries]
            if not batch:
                break
            served_round = await dev_round(client, batch, args)
            rewarded = sum(x["rewarded"] for x in rounds_out) + served_round["rewarded"]
            await asyncio.to_thread(wait_for_rewards, trainer, rewarded)
            probe = ProbeTraffic(url, tests[0].items[0].prompt)
            with probe:
                outcome = await asyncio.to_thread(trainer.train_pending)
            probe_sent, probe_failed = probe_sent + probe.sent, probe_failed + probe.failed
            probe_errors += probe.errors[:3]
            point = await served_test_score(client, tests, args.seed, args.concurrency,
                                            f"round-{r}")  # fmt: skip
            curve.append({"round": r, "queries": r * args.queries,
                          "version": trainer.served().version, **point})  # fmt: skip
            rounds_out.append({**served_round, "round": r, "probe_requests": probe.sent,
                               "probe_failed": probe.failed,
                               "promoted": bool(outcome and outcome.promoted),
                               "reason": outcome.reason if outcome else "no examples"})  # fmt: skip
    failed = (sum(x["failed"] for x in rounds_out) + sum(p["failed"] for p in curve)
              + probe_failed)  # fmt: skip
    return {"curve": curve, "rounds": rounds_out, "failed_requests": failed,
            "probe_requests_during_promotions": probe_sent, "probe_errors": probe_errors,
            "promotions": sum(x["promoted"] for x in rounds_out)}  # fmt: skip


def bad_candidate(config, judge, work: Path) -> dict:
    """A trainer over the same log with its rewards inverted: its one candidate must be
    refused and never served."""
    from antiphon.training.online_learners import SwitchLearner
    from antiphon.training.online_trainer import OnlineTrainer

    bad = config.model_copy(update={"invert_rewards": True, "consumer": "inverted",
                                    "examples_per_candidate": BAD_EXAMPLES,
                                    "state_dir": str(work / "state-inverted")})  # fmt: skip
    trainer = OnlineTrainer(bad, SwitchLearner(bad.train), judge)
    served_before = trainer.served().version
    outcomes = trainer.poll(max_candidates=1) or [trainer.train_pending()]
    outcome = outcomes[0]
    assert outcome is not None  # the log holds rewarded requests
    return {"version": outcome.version.version, "refused": not outcome.promoted,
            "reason": outcome.reason,
            "served_unchanged": trainer.served().version == served_before}  # fmt: skip


def summary(report: dict, args: argparse.Namespace) -> dict:
    curve = report["curve"]
    return {
        "command": "python -m antiphon.experiments.online",
        "setup": {k: v for k, v in vars(args).items() if k != "out"},
        "initial_score": curve[0]["score"], "initial_interval": curve[0]["interval"],
        "final_score": curve[-1]["score"], "final_interval": curve[-1]["interval"],
        "offline_score": report["offline"]["score"],
        "offline_interval": report["offline"]["interval"],
        "final_within_10_of_offline": curve[-1]["score"] >= report["offline"]["score"] - 10,
        "rose": curve[-1]["score"] > curve[0]["score"],
        "failed_requests": report["failed_requests"],
        "promotions": report["promotions"],
        "bad_candidate_refused": report["bad_candidate"]["refused"]
        and report["bad_candidate"]["served_unchanged"],
        **report,
    }  # fmt: skip


def markdown(result: dict) -> str:
    rows = "\n".join(
        f"| {p['round']} | {p['queries']} | {p['score']} ({p['interval'][0]}-{p['interval'][1]})"
        f" | {p['version']} |"
        for p in result["curve"]
    )
    off = result["offline_interval"]
    return (
        "# Online learning of the switcher (test split)\n\n"
        f"Command: `{result['command']}` ({result['seconds']} s). Setup: "
        f"`{json.dumps(result['setup'])}`\n\n"
        "Served switch score (100 x mean verified score per test item, 95% bootstrap interval)"
        " after each round of dev traffic:\n\n| round | dev queries | score | served version |\n"
        f"|---:|---:|---|---|\n{rows}\n\n"
        f"Offline-trained switcher (`zoo:switcher`), same items: {result['offline_score']} "
        f"({off[0]}-{off[1]}).\n\n"
        f"- failed requests: {result['failed_requests']} (of them during promotions: "
        f"{sum(r['probe_failed'] for r in result['rounds'])} of "
        f"{result['probe_requests_during_promotions']} sent while a candidate was judged and "
        "published)\n"
        f"- promotions: {result['promotions']} of {len(result['rounds'])} candidates\n"
        f"- the inverted-reward candidate refused: {result['bad_candidate_refused']} "
        f"({result['bad_candidate']['reason']})\n"
        f"- final within 10 points of offline: {result['final_within_10_of_offline']}; "
        f"rose from the initial: {result['rose']}\n"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    x = [p["queries"] for p in curve]
    y = [p["score"] for p in curve]
    low = [p["interval"][0] for p in curve]
    high = [p["interval"][1] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, y, marker="o", label="served switch (online)")
    ax.fill_between(x, low, high, alpha=0.2)
    ax.axhline(result["offline_score"], color="gray", linestyle="--",
               label="offline-trained switcher")  # fmt: skip
    ax.set_xlabel("dev queries streamed (with rewards)")
    ax.set_ylabel("test score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--queries", type=int, default=48, help="dev queries per round")
    p.add_argument("--dev-limit", type=int, default=6, help="dev items per task the gate uses")
    p.add_argument("--test-limit", type=int, default=12, help="test items per task")
    p.add_argument("--segment-len", type=int, default=4)
    p.add_argument("--replay", type=int, default=512)
    p.add_argument("--explore", type=float, default=0.5,
                   help="share of dev queries answered by one writer alone")  # fmt: skip
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = summary(run(args), args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "online.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "online.md").write_text(markdown(result))
    plot(result, args.out / "online.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
