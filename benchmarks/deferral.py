"""Co-LLM deferral's speed: what deferring costs against the base alone, and against the
reference implementation's way of decoding.

    python benchmarks/deferral.py     # prints a table, writes benchmarks/results/deferral.json
    python benchmarks/deferral.py --repeats 1                   # quicker

Two random-weight checkpoints of one shape (they rarely write an end token, so every run
writes its whole budget), the base with a random gate. The assistant is a second copy of the
base's weights in its own engine: what a deferral costs does not depend on the weights, and
with equal weights the answer is the base's own whatever is deferred, so a threshold at the
90% quantile of the gates along the base's answers defers 10% of the tokens (with another
assistant one deferral changes every gate after it, and the rate jumps with eta). Ratios
measured in the same run, greedy, same prompts, through the same coordinator (in process: the
engine and coordinator code of a deployment, without the Ray hops, which the collab benchmark
measures):
- `defer_vs_single`: tokens/s of `defer` (the base drafts until its gate fires, inside one
  generate call; the assistant writes one token; the base continues from its cache) / tokens/s
  of the base alone (`fixed`, one segment). Target >= 0.8.
- `defer_vs_reprefill_256`: tokens/s of `defer` / tokens/s of the reference approach written
  faithfully here (clinicalml/co-llm's generate loop: for every token both the base's forward
  pass over the whole prefix (logits and gate) and, where the gate fires, the assistant's over
  the whole prefix, no KV cache), at 256 new tokens. Target >= 5. Both write the same tokens
  (checked: `same_tokens`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from antiphon.actors.engine import ModelEngine
from antiphon.actors.gate import load_gate, save_gate
from antiphon.checkpoint import load_checkpoint, load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.messages import SamplingParams
from antiphon.training.gate_data import head_inputs
from antiphon.zoo.random_model import write_random_checkpoint
from antiphon.zoo.train import ModelShape

PROMPTS = (
    "Once upon a time",
    "The fox went to the river and",
    "Q: What is the capital of",
    "In the village there was",
    "She opened the door and",
    "Q: What is 12 + 30?\nA:",
)
SHAPE = ModelShape(hidden=512, layers=8, heads=8, context=512)
RESULTS = Path(__file__).parent / "results" / "deferral.json"
TARGET_RATE = 0.10


def checkpoints(work: Path) -> dict[str, Path]:
    paths = {n: write_random_checkpoint(work / n, seed=0, shape=SHAPE)
             for n in ("base", "assistant")}  # fmt: skip
    hidden = SHAPE.hidden
    # weights of variance 1/hidden on a normalised hidden state: logits ~ N(0, 1), gates
    # spread over (0, 1)
    weight = torch.randn(hidden, generator=torch.Generator().manual_seed(7)) / hidden**0.5
    save_gate(work / "gate.safetensors", weight)
    return paths


async def probe_eta(engine: ModelEngine, new_tokens: int) -> float:
    """The gate's (1 - TARGET_RATE) quantile along the base's own greedy answers."""
    gates: list[float] = []
    for prompt in PROMPTS:
        s = await engine.open(prompt)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        gates += (await engine.generate(s.session_id, params)).gates
        await engine.close(s.session_id)
    return float(torch.quantile(torch.tensor(gates), 1 - TARGET_RATE))


async def timed(coord: Coordinator, policy: str, params: dict, new_tokens: int, repeats: int):
    """Tokens/s and the tokens written per prompt; the share the assistant wrote."""
    tokens = seconds = helped = 0
    written = {}
    for _ in range(repeats):
        for prompt in PROMPTS:
            req = GenerationRequest(prompt=prompt, models=("base", "assistant"), policy=policy,
                                    policy_params=params, max_tokens=new_tokens)  # fmt: skip
            t0 = time.perf_counter()
            result = await coord.generate(req)
            seconds += time.perf_counter() - t0
            ids = [t for s in result.segments for t in s.token_ids]
            tokens += len(ids)
            helped += sum(len(s.token_ids) for s in result.segments if s.model == "assistant")
            written[prompt] = ids
    return tokens / seconds, written, helped / max(1, tokens)


@torch.no_grad()
def reprefill(paths: dict[str, Path], gate_file: Path, eta: float, new_tokens: int):
    """The reference loop: per token, the whole prefix through the base (with its gate) and,
    when the gate fires, through the assistant; greedy; tokens/s and the tokens."""
    base, tok = load_checkpoint(ModelSpec(name="base", path=str(paths["base"])))
    assistant, _ = load_checkpoint(ModelSpec(name="assistant", path=str(paths["assistant"])))
    gate = load_gate(gate_file, SHAPE.hidden)
    tokens, seconds, written = 0, 0.0, {}
    for prompt in PROMPTS:
        ids = list(tok(prompt)["input_ids"])
        start = len(ids)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            prefix = torch.tensor([ids])  # (1, L): the whole prefix again, every token
            logits, hidden = head_inputs(base, prefix, torch.ones_like(prefix))
            logits = logits[0, -1]  # (V,)
            if float(gate(hidden[0, -1])) >= eta:
                logits = assistant(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
        seconds += time.perf_counter() - t0
        tokens += new_tokens
        written[prompt] = ids[start:]
    return tokens / seconds, written


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = checkpoints(work)
        gate_file = work / "gate.safetensors"
        engines = {
            "base": ModelEngine(ModelSpec(name="base", path=str(paths["base"]),
                                          gate_path=str(gate_file))),
            "assistant": ModelEngine(ModelSpec(name="assistant", path=str(paths["assistant"]))),
        }  # fmt: skip
        tokenizer = load_tokenizer(str(paths["base"]))
        coord = Coordinator(engines, {n: tokenizer for n in engines})
        try:
            eta = await probe_eta(engines["base"], args.new_tokens)
            defer = {"base": "base", "assistant": "assistant", "eta": eta,
                     "segment_len": args.new_tokens}  # fmt: skip
            single = {"model": "base", "segment_len": args.new_tokens}
            await timed(coord, "defer", defer, 8, 1)  # warm up
            runs: dict[str, list[float]] = {"single": [], "defer": []}
            for _ in range(args.repeats):  # interleaved: load changes hit both alike
                tps, alone, _ = await timed(coord, "fixed", single, args.new_tokens, 1)
                runs["single"].append(tps)
                tps, ours, rate = await timed(coord, "defer", defer, args.new_tokens, 1)
                runs["defer"].append(tps)
        finally:
            for e in engines.values():
                await e.shutdown()
        ref_tps, theirs = reprefill(paths, gate_file, eta, args.new_tokens)
    single_tps, defer_tps = statistics.median(runs["single"]), statistics.median(runs["defer"])
    return {
        "new_tokens": args.new_tokens, "eta": round(eta, 6), "deferral_rate": round(rate, 4),
        "tokens_per_s": {"single": round(single_tps, 1), "defer": round(defer_tps, 1),
                         "reprefill": round(ref_tps, 1)},
        "defer_vs_single": round(defer_tps / single_tps, 3),
        f"defer_vs_reprefill_{args.new_tokens}": round(defer_tps / ref_tps, 2),
        "same_tokens": ours == theirs == alone,
        "targets": {"defer_vs_single": ">= 0.8", "defer_vs_reprefill_256": ">= 5"},
    }  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    out = asyncio.run(main_async(args))
    print(f"{'figure':<28} {'value':>10}  target")
    print(f"{'defer_vs_single':<28} {out['defer_vs_single']:>10}  >= 0.8")
    key = f"defer_vs_reprefill_{args.new_tokens}"
    print(f"{key:<28} {out[key]:>10}  >= 5")
    print(f"{'deferral_rate':<28} {out['deferral_rate']:>10}  ~0.1")
    print(f"{'same_tokens':<28} {str(out['same_tokens']):>10}  True")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
