"""`antiphon train gate`: Co-LLM's deferral gate for a base and an assistant checkpoint
(`antiphon.training.gate_pipeline`: teacher forcing, weak labels, marginal likelihood, the
threshold search on held-back dev items).

    antiphon train gate --base zoo:sft --assistant zoo:strong --out gates/sft+strong
    antiphon train gate ... --joint full          # also the base with the gate (or: lora)
    # as a Ray job (the same command on the cluster; OUT on the head node's disk):
    ray job submit --working-dir . -- antiphon train gate --base zoo:sft ...

Serve the result with the base's `gate_path: OUT/gate.safetensors` and policy `defer` at the
card's eta (OUT/gate_card.json says both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base checkpoint: path, hub id or zoo:NAME")
    p.add_argument("--assistant", required=True, help="assistant checkpoint (frozen)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--tasks", nargs="*", help="zoo tasks of the gold text (default: the exact "
                   "tasks but the held-out family)")  # fmt: skip
    p.add_argument("--weak-steps", type=int, default=300, help="weak-label steps (default 300)")
    p.add_argument("--marginal-steps", type=int, default=600,
                   help="marginal-likelihood steps (default 600)")  # fmt: skip
    p.add_argument("--joint", choices=("none", "full", "lora"), default="none",
                   help="also train the base with the gate (default: the gate alone)")  # fmt: skip
    p.add_argument("--joint-steps", type=int, default=200, help="joint training steps")
    p.add_argument("--rates", type=float, nargs="*",
                   help="deferral rates swept (default 0, 0.1, ..., 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")


def config_of(args: argparse.Namespace):
    from antiphon.training.gate_pipeline import GatePairConfig

    fields = dict(base=args.base, assistant=args.assistant, out=args.out, seed=args.seed,
                  weak_steps=args.weak_steps, marginal_steps=args.marginal_steps,
                  joint=args.joint, joint_steps=args.joint_steps)  # fmt: skip
    if args.tasks:
        fields["tasks"] = tuple(args.tasks)
    if args.rates:
        fields["rates"] = tuple(args.rates)
    return GatePairConfig(**fields)


def run(args: argparse.Namespace) -> dict:
    from antiphon.training.gate_pipeline import CARD_FILE, train_gate_pair

    report = asyncio.run(train_gate_pair(config_of(args)))
    for name, gate in report.card["gates"].items():
        print(f"{name}: eta {gate['eta']}, validation score {gate['val_score']}, "
              f"deferral rate {gate['val_deferral_rate']:.1%}")  # fmt: skip
        if gate["warning"]:
            print(f"WARNING ({name}): {gate['warning']}")
    print(f"wrote {args.out / CARD_FILE}")
    return report.card


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    card = run(parser.parse_args(argv))
    print(json.dumps(card["serve"]))
    return card


if __name__ == "__main__":
    main()
