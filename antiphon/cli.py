"""The `antiphon` command.

    antiphon demo                       # local Ray, default ensemble on CPU, one coloured answer
    antiphon serve [CONFIG]             # serve a config (default ensemble on 127.0.0.1:8000)
    antiphon generate "Once upon"       # ask a running server (or --local: a throwaway one)
    antiphon status                     # is the server up, which ensembles does it serve
    antiphon zoo build --scale tiny     # train the zoo's checkpoints
    antiphon train switcher --ensemble base,sft,aligned --tasks knowledge --out runs/switch
    antiphon eval --ensemble default --policy round_robin --split test
    antiphon policy versions --store runs/policy   # the switcher's versions; which is served
    antiphon policy rollback --store runs/policy [--to VERSION]

Logs go to stderr (console format; JSON inside the server's actors); answers to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from antiphon.deploy.api import GenerateResponse, Segment
from antiphon.experiments import train_gate, train_online, train_switcher

DEFAULT_URL = "http://127.0.0.1:8000"
APP_NAME = "antiphon"
EVAL_RETRIES = 20  # tries per eval item while the server answers 503 (busy)

# ANSI colours for writers, in order of first appearance; bold so they read on dark and light.
_COLOURS = ("\x1b[1;36m", "\x1b[1;33m", "\x1b[1;35m", "\x1b[1;32m", "\x1b[1;34m", "\x1b[1;31m")
_RESET = "\x1b[0m"


# --- output --------------------------------------------------------------------------------


class SegmentPrinter:
    """Prints segments as they arrive, each coloured by its model (or tagged `[model|...]` when
    colour is off), and a legend of the models first."""

    def __init__(self, models: Iterable[str], colour: bool, out=None) -> None:
        self.out = out or sys.stdout
        self.colour = colour
        self.colours = {m: _COLOURS[i % len(_COLOURS)] for i, m in enumerate(models)}

    def paint(self, model: str, text: str) -> str:
        if model not in self.colours:
            self.colours[model] = _COLOURS[len(self.colours) % len(_COLOURS)]
        return f"{self.colours[model]}{text}{_RESET}" if self.colour else f"[{model}|{text}]"

    def legend(self) -> None:
        keys = "  ".join(self.paint(m, m) for m in self.colours)
        self.out.write(f"writers: {keys}\n\n")

    def segment(self, segment: Segment) -> None:
        self.out.write(self.paint(segment.model, segment.text))
        self.out.flush()

    def summary(self, result: GenerateResponse | None) -> None:
        self.out.write("\n\n")
        if result is None:
            return
        counts: dict[str, int] = {}
        for s in result.segments:
            counts[s.model] = counts.get(s.model, 0) + s.num_tokens
        share = ", ".join(f"{m}: {n} tokens" for m, n in counts.items())
        self.out.write(
            f"{len(result.segments)} segments ({share}); finish: {result.finish_reason}; "
            f"policy: {result.policy}; request id: {result.id}\n"
        )


def _use_colour(choice: str) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


# --- local cluster -------------------------------------------------------------------------


def start_server(config, address: str | None = None, blocking: bool = False) -> str:
    """Deploy `config` as the Serve app 'antiphon' and return its URL. Ray: join `address`
    (None: $RAY_ADDRESS or a running local cluster, else start one; "local": always a new one)."""
    import ray
    from ray import serve

    from antiphon.deploy.app import build_app

    app = build_app(config)  # validates everything before any actor starts
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=blocking)
    http = {"host": config.serving.host, "port": config.serving.port}
    serve.start(http_options=http)
    serve.run(app, name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if config.serving.host in ("0.0.0.0", "::") else config.serving.host
    return f"http://{host}:{config.serving.port}"


@contextmanager
def local_server(config_path: str | None) -> Iterator[tuple[str, object]]:
    """A throwaway local Ray + Serve with the config on a free port; torn down on exit."""
    import ray
    from ray import serve

    from antiphon.deploy.app import free_port

    config = _load(config_path)
    serving = config.serving.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    config = config.model_copy(update={"serving": serving})
    started_ray = not ray.is_initialized()
    try:
        url = start_server(config, address="local")  # private: never touch a running cluster
        yield url, config
    finally:
        if ray.is_initialized():
            serve.shutdown()
            if started_ray:
                ray.shutdown()


def _load(config_path: str | None):
    from antiphon.deploy.config import load_config
    from antiphon.deploy.default import default_config

    return load_config(config_path) if config_path else default_config()


# --- commands --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from antiphon.logging import configure_logging, get_logger

    configure_logging("json")
    config = _load(args.config)
    update = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if update:
        config = config.model_copy(update={"serving": config.serving.model_copy(update=update)})
    url = start_server(config, address=args.address, blocking=True)
    get_logger("antiphon.cli").info(
        "serving", url=url, ensembles=[e.name for e in config.ensembles],
        api_key=config.serving.has_api_key,
    )  # fmt: skip
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        import signal

        from ray import serve

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut shutdown
        get_logger("antiphon.cli").info("shutting_down")
        serve.shutdown()
    return 0


def _generate_options(args: argparse.Namespace) -> dict[str, object]:
    params = json.loads(args.policy_params) if args.policy_params else None
    return {
        "ensemble": args.ensemble,
        "policy": args.policy,
        "policy_params": params,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }


def _print_answer(url: str, api_key: str | None, prompt: str, options: dict, colour: bool,
                  as_json: bool) -> None:  # fmt: skip
    from antiphon.client import Client

    with Client(url, api_key=api_key) as client:
        if as_json:
            print(client.generate(prompt, **options).model_dump_json(indent=2))
            return
        ensemble = options.get("ensemble")
        cards = client.models()
        card = next((c for c in cards if c.id == ensemble), cards[0] if cards else None)
        printer = SegmentPrinter(card.antiphon_models if card else (), colour)
        printer.legend()
        print(prompt, end="", flush=True)
        stream = client.stream(prompt, **options)
        for segment in stream:
            printer.segment(segment)
        printer.summary(stream.result)


def cmd_generate(args: argparse.Namespace) -> int:
    options = _generate_options(args)
    colour = _use_colour(args.color)
    if args.local is not None:
        with local_server(args.local or None) as (url, _):
            _print_answer(url, None, args.prompt, options, colour, args.json)
    else:
        _print_answer(args.url, args.api_key, args.prompt, options, colour, args.json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from antiphon.client import Client

    with Client(args.url, api_key=args.api_key, timeout=10) as client:
        health = client.health()
        if health is None:
            print(f"no antiphon server answers at {args.url}")
            return 1
        if health.status == "ok":
            print(f"antiphon server at {args.url}: healthy")
        else:
            problems = "; ".join(f"{part}: {why}" for part, why in health.degraded.items())
            print(f"antiphon server at {args.url}: degraded ({problems})")
        for card in client.models():
            print(f"  ensemble {card.id}: models {', '.join(card.antiphon_models)}; "
                  f"default policy {card.antiphon_policy}")  # fmt: skip
    return 0


DEMO_PROMPT = "Once upon a time"
SWITCHED_ENSEMBLE = "switched"  # default.yaml's Switch Generation ensemble (zoo:switcher)


def demo_question() -> dict | None:
    """The question the shipped switcher's card names for the demo (one every single model
    gets wrong and Switch Generation gets right, on the test split), or None."""
    from antiphon.checkpoint import ZOO_DIR

    card = ZOO_DIR / "switcher" / "antiphon_switcher.json"
    return json.loads(card.read_text()).get("demo") if card.exists() else None


def cmd_demo(args: argparse.Namespace) -> int:
    from antiphon.client import Client
    from antiphon.deploy.default import zoo_available

    which = "the zoo's ensembles" if zoo_available() else "a random-weight pair (no zoo)"
    print(f"antiphon demo: starting a local Ray and deploying {which} on CPU ...", flush=True)
    with local_server(None) as (url, config):
        print(f"serving at {url}\n", flush=True)
        colour = _use_colour(args.color)
        question = demo_question() if args.prompt is None else None
        switched = next((e for e in config.ensembles if e.name == SWITCHED_ENSEMBLE), None)
        if question is None or switched is None:
            options = dict(max_tokens=args.max_tokens)
            _print_answer(url, None, args.prompt or DEMO_PROMPT, options, colour, False)
        else:
            print(f"Switch Generation on a {question['task']} question from the test split, "
                  "which every model alone gets wrong:\n")  # fmt: skip
            # greedy, as the experiment asked it
            options = dict(ensemble=SWITCHED_ENSEMBLE, max_tokens=question["max_tokens"],
                           temperature=0.0)  # fmt: skip
            _print_answer(url, None, question["prompt"], options, colour, False)
            printer = SegmentPrinter(switched.models, colour)
            with Client(url) as client:
                for model in switched.models:
                    alone = client.generate(question["prompt"], ensemble=SWITCHED_ENSEMBLE,
                                            policy="fixed", policy_params={"model": model},
                                            max_tokens=question["max_tokens"],
                                            temperature=0.0)  # fmt: skip
                    print(f"{model} alone:{printer.paint(model, alone.text)}")
    print("done; local cluster shut down.")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    import yaml

    from antiphon.deploy.serve_config import serve_config

    file = serve_config(_load(args.config), app_name=args.name, route_prefix=args.route_prefix)
    text = yaml.safe_dump(file, sort_keys=False)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        print(f"Serve config written to {args.out}: serve deploy {args.out} (or serve run)")
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from antiphon.zoo.build import build_zoo, install_checkpoints

    out = build_zoo(Path(args.out), args.scale)
    print(f"zoo written to {out}")
    if args.install:
        print(f"installed into {install_checkpoints(out)}")
    return 0


def _run_eval(url: str, api_key: str | None, args: argparse.Namespace) -> list:
    import asyncio

    from antiphon.client import AsyncClient
    from antiphon.errors import retry_overloaded
    from antiphon.messages import SamplingParams
    from antiphon.zoo.evaluate import evaluate_async, zoo_tasks
    from antiphon.zoo.tasks import TASK_NAMES

    tasks = [
        dataclasses.replace(task, items=task.items[: args.limit]) if args.limit else task
        for task in zoo_tasks(args.split, args.tasks or TASK_NAMES).values()
    ]
    params = json.loads(args.policy_params) if args.policy_params else None

    async def run() -> list:
        async with AsyncClient(url, api_key=api_key) as client:

            async def ask(prompt: str, sampling: SamplingParams) -> str:
                answer = await client.generate(
                    prompt, ensemble=args.ensemble, policy=args.policy, policy_params=params,
                    max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                    top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
                    stop=list(sampling.stop_strings) or None,
                )  # fmt: skip
                return answer.text

            async def generate(prompt: str, sampling: SamplingParams) -> str:
                # A shared server may be busy: back off and retry rather than lose the item.
                return await retry_overloaded(lambda: ask(prompt, sampling), EVAL_RETRIES)

            return await evaluate_async(
                generate, tasks, policy=args.policy, ensemble=args.ensemble,
                seed=args.seed, concurrency=args.concurrency,
            )  # fmt: skip

    return asyncio.run(run())


def cmd_eval(args: argparse.Namespace) -> int:
    from antiphon.zoo.evaluate import markdown_table, plot, write_json

    if args.url:
        results = _run_eval(args.url, args.api_key, args)
    else:
        with local_server(args.config) as (url, _):
            results = _run_eval(url, None, args)
    print(markdown_table(results))
    if args.out:
        out = Path(args.out)
        print(f"wrote {write_json(results, out, seed=args.seed)}")
        print(f"wrote {plot(results, out.with_suffix('.png'))}")
    return 0


VERSIONS_HEADER = (
    "| version | step | status | dev score (95% interval) | served | examples | log offsets |\n"
    "|---|---:|---|---|:---:|---:|---|"
)


def _version_row(v, served: str | None) -> str:
    """One `policy versions` row of a store's VersionInfo."""
    offsets = v.provenance.get("log_offsets")
    cells = (
        v.version, str(v.step), v.status, str(v.dev_score) if v.dev_score else "-",
        "*" if v.version == served else "", str(v.provenance.get("examples", "-")),
        "-" if offsets is None else "..".join(str(o) for o in offsets),
    )  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def cmd_policy_versions(args: argparse.Namespace) -> int:
    from antiphon.training.policy_versions import PolicyStore

    store = PolicyStore(args.store, create=False)
    served = store.served()
    print(VERSIONS_HEADER)
    for v in store.versions():
        print(_version_row(v, served.version if served else None))
    return 0


def cmd_policy_rollback(args: argparse.Namespace) -> int:
    from antiphon.training.policy_versions import PolicyStore

    store = PolicyStore(args.store, create=False)
    was = store.served()
    now = store.rollback(args.to, reason=args.reason)
    score = f", dev score {now.dev_score}" if now.dev_score else ""
    print(f"rolled back from {was.version if was else '-'}: now serving {now.version} "
          f"(step {now.step}{score})")  # fmt: skip
    return 0


# --- parser ----------------------------------------------------------------------------------


def cmd_train_switcher(args: argparse.Namespace) -> int:
    train_switcher.run(args)
    return 0


def cmd_train_gate(args: argparse.Namespace) -> int:
    train_gate.run(args)
    return 0


def cmd_train_online(args: argparse.Namespace) -> int:
    return train_online.run(args)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", help="ensemble name (default: the server's first)")
    p.add_argument("--policy", help="policy name (default: the ensemble's)")
    p.add_argument("--policy-params", help="policy parameters as JSON, e.g. '{\"segment_len\": 4}'")
    p.add_argument("--max-tokens", type=int, help="response token budget")
    p.add_argument("--temperature", type=float, help="0: greedy (default)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour segments by model (auto: when stdout is a terminal)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antiphon",
        description="Several checkpoints of one model family take turns writing one response.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="serve a config over HTTP (blocks)")
    p.add_argument("config", nargs="?", help="YAML config (default: the default ensemble)")
    p.add_argument("--host", help="override serving.host")
    p.add_argument("--port", type=int, help="override serving.port")
    p.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS or a new local one)"
    )
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("generate", help="generate one answer, segments coloured by model")
    p.add_argument("prompt", help="prompt text")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    p.add_argument("--api-key", default=os.environ.get("ANTIPHON_API_KEY"),
                   help="API key (default: $ANTIPHON_API_KEY)")  # fmt: skip
    p.add_argument("--local", nargs="?", const="", metavar="CONFIG",
                   help="start a throwaway local server (with CONFIG, or the default)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    _add_generation_args(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("status", help="is a server up, and what does it serve")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    p.add_argument("--api-key", default=os.environ.get("ANTIPHON_API_KEY"), help="API key")
    p.set_defaults(run=cmd_status)

    p = sub.add_parser("demo", help="local Ray + default ensemble on CPU, one coloured answer")
    p.add_argument("--prompt", default=None,
                   help="prompt (default: the shipped switcher's demo question, else "
                        f"{DEMO_PROMPT!r} to the default ensemble)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64, help="token budget of --prompt")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour segments by model (auto: when stdout is a terminal)")  # fmt: skip
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("build", help="write a Serve config file (serve deploy / serve run / "
                       "KubeRay's serveConfigV2) for a config")  # fmt: skip
    p.add_argument("config", nargs="?", help="YAML config (default: the default ensemble)")
    p.add_argument("-o", "--out", default="serve.yaml", help="output file; - for stdout")
    p.add_argument("--name", default=APP_NAME, help=f"application name (default: {APP_NAME})")
    p.add_argument("--route-prefix", default="/", help="the application's route prefix")
    p.set_defaults(run=cmd_build)

    zoo = sub.add_parser("zoo", help="the project's own checkpoints")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    p = zoo_sub.add_parser("build", help="train the zoo's checkpoints")
    p.add_argument("--out", default="zoo-build", help="output directory (default: zoo-build)")
    p.add_argument("--scale", choices=("tiny", "full"), default="full", help="model/data scale")
    p.add_argument("--install", action="store_true", help="copy the result into the package")
    p.set_defaults(run=cmd_zoo_build)

    train = sub.add_parser("train", help="train a policy from rollouts or logged turns")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="WHAT")
    p = train_sub.add_parser("switcher", help="rollouts on zoo tasks, then train the switcher")
    train_switcher.add_arguments(p)
    p.set_defaults(run=cmd_train_switcher)
    p = train_sub.add_parser("gate", help="Co-LLM's deferral gate for a base and an assistant")
    train_gate.add_arguments(p)
    p.set_defaults(run=cmd_train_gate)
    p = train_sub.add_parser("online", help="learn the switcher from the turn log, live")
    train_online.add_arguments(p)
    p.set_defaults(run=cmd_train_online)

    p = sub.add_parser("eval", help="score an ensemble and policy on the zoo's tasks")
    p.add_argument("--url", help="a running server to ask (default: a throwaway local one)")
    p.add_argument("--api-key", default=os.environ.get("ANTIPHON_API_KEY"), help="API key")
    p.add_argument("--config", help="YAML config of the local server (default: the default)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--ensemble", required=True, help="ensemble name")
    p.add_argument("--policy", required=True, help="policy name")
    p.add_argument("--policy-params", help="policy parameters as JSON")
    p.add_argument("--tasks", nargs="*", help="task names (default: all)")
    p.add_argument("--split", default="test", help="task split (default: test)")
    p.add_argument("--limit", type=int, help="first N items of each task (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same numbers)")
    p.add_argument("--out", help="also write the report here (JSON, and a plot beside it: .png)")
    p.set_defaults(run=cmd_eval)

    policy = sub.add_parser("policy", help="the switcher's stored versions: list, roll back")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="WHAT")
    p = policy_sub.add_parser("versions", help="every stored version; which one is served")
    p.add_argument("--store", required=True, help="policy store directory")
    p.set_defaults(run=cmd_policy_versions)
    p = policy_sub.add_parser("rollback", help="serve the previously served version again")
    p.add_argument("--store", required=True, help="policy store directory")
    p.add_argument("--to", metavar="VERSION", help="a version served before (default: the last)")
    p.add_argument("--reason", default="manual rollback (antiphon policy rollback)",
                   help="why, kept in the store's history")  # fmt: skip
    p.set_defaults(run=cmd_policy_rollback)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `antiphon` console script."""
    import httpx

    from antiphon.errors import AntiphonError
    from antiphon.logging import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging("console")
    try:
        return args.run(args)
    except AntiphonError as e:
        print(f"antiphon: error: {type(e).__name__}: {e.message}", file=sys.stderr)
        return 1
    except httpx.TransportError as e:
        print(f"antiphon: error: cannot reach the server: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
