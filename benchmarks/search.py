"""Weak-to-strong search's cost: what the guides score, and chunk-level beam search against
Best-of-N.

    python benchmarks/search.py     # prints a table, writes benchmarks/results/search.json
    python benchmarks/search.py --repeats 1                   # quicker

Random-weight checkpoints: a proposer of the deferral benchmark's shape and a guide pair of the
tiny shape (one tokenizer), through the coordinator in process (the engine and coordinator
code of a deployment, without the Ray hops). 256 new tokens, temperature 1, seeds per prompt.
- `guide_tokens_full_vs_incremental_256`: positions the guides run forward on in the
  reference approach (the paper's code: every step, every child's whole sequence, prompt and
  response, through both guides) / in ours (the guides' engines count them: the prompt once,
  then each child's chunk once, from sessions forked with its parent), CBS W=K=4, L=16.
  Target >= 5. The reference samples the same chunks (same engine, same seeds) and ranks by
  its full re-scores: `same_text` checks that both searches commit the same responses.
- `cbs_vs_bon_time`: wall time of CBS W=K=4, L=16 / wall time of BoN N=16, both sampling
  up to 16 x 256 proposer tokens (`proposer_tokens` says how many each did: an end token
  ends a sample early; `cbs_vs_bon_time_per_token` is the ratio per token). Target <= 1.3.
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
from antiphon.checkpoint import load_checkpoint, load_tokenizer
from antiphon.config import ModelSpec
from antiphon.coordinator.executors.base import derive_seed
from antiphon.coordinator.executors.search import rank
from antiphon.coordinator.loop import Coordinator
from antiphon.coordinator.request import GenerationRequest
from antiphon.messages import SamplingParams
from antiphon.zoo.random_model import TINY_SHAPE, write_random_checkpoint
from antiphon.zoo.train import ModelShape

PROMPTS = ("Once upon a time", "The fox went to the river and", "Review of the lamp:")
PROPOSER_SHAPE = ModelShape(hidden=512, layers=8, heads=8, context=512)
RESULTS = Path(__file__).parent / "results" / "search.json"
W = K = 4
L = 16
SEED = 5
MODELS = ("proposer", "tuned", "untuned")


def search_request(prompt: str, params: dict, new_tokens: int) -> GenerationRequest:
    roles = {"proposer": "proposer", "tuned": "tuned", "untuned": "untuned"}
    return GenerationRequest(prompt=prompt, models=MODELS, policy="w2s_search",
                             policy_params={**roles, **params}, max_tokens=new_tokens,
                             temperature=1.0, seed=SEED)  # fmt: skip


async def ours(coord: Coordinator, engines: dict, params: dict, new_tokens: int):
    """Per prompt: the response, wall seconds; and the guides' and proposer's token counts."""
    guides0 = sum(engines[g].stats().forward_tokens for g in ("tuned", "untuned"))
    prop0 = engines["proposer"].stats().tokens_generated
    texts, seconds = {}, 0.0
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        result = await coord.generate(search_request(prompt, params, new_tokens))
        seconds += time.perf_counter() - t0
        texts[prompt] = result.text
    guides = sum(engines[g].stats().forward_tokens for g in ("tuned", "untuned")) - guides0
    return texts, seconds, guides, engines["proposer"].stats().tokens_generated - prop0


@torch.no_grad()
def full_logprob(model, ids: list[int], start: int) -> float:
    """log p(ids[start:] | ids[:start]) from one forward over the whole sequence."""
    logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(lp[start - 1 :].sum())


async def reference(engine: ModelEngine, guides: dict, tokenizer, prompt: str, new_tokens: int):
    """CBS(W, K, L) as the paper's code runs it: the proposer samples the chunks (our engine,
    our seeds: the same chunks as ours), and every step each child's whole sequence goes
    through both guides. Returns the committed response and the guide positions run."""

    class Beam:
        def __init__(self, sid, ids, score, finished):
            self.session_id, self.ids, self.score, self.finished = sid, ids, score, finished

    prompt_ids = list(tokenizer(prompt)["input_ids"])
    root = await engine.open(prompt_ids)
    beams, turn, guide_tokens, first = [Beam(root.session_id, [], 0.0, False)], 0, 0, True
    while not all(b.finished for b in beams):
        live = [b for b in beams if not b.finished]
        children = []
        for i, parent in enumerate(live):
            n = W * K if first else K
            sids = await engine.fork(parent.session_id, n)
            room = new_tokens - len(parent.ids)
            gens = await asyncio.gather(*(
                engine.generate(sid, SamplingParams(max_new_tokens=min(L, room), temperature=1.0,
                                                    seed=derive_seed(SEED, turn, i, k)))
                for k, sid in enumerate(sids)
            ))  # fmt: skip
            for sid, g in zip(sids, gens, strict=True):
                ids = parent.ids + list(g.token_ids)
                full = prompt_ids + ids
                score = full_logprob(guides["tuned"], full, len(prompt_ids)) - full_logprob(
                    guides["untuned"], full, len(prompt_ids))  # fmt: skip
                guide_tokens += 2 * len(full)
                done = g.finish_reason == "eos" or len(ids) >= new_tokens
                children.append(Beam(sid, ids, score, done))
        kept = rank([b for b in beams if b.finished] + children, W)
        for b in live + children:
            if b not in kept:
                await engine.close(b.session_id)
        beams, turn, first = kept, turn + 1, False
    best = max(beams, key=lambda b: b.score)
    for b in beams:
        await engine.close(b.session_id)
    return tokenizer.decode(best.ids, skip_special_tokens=True), guide_tokens


async def main_async(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = {
            "proposer": write_random_checkpoint(work / "proposer", seed=0, shape=PROPOSER_SHAPE),
            "tuned": write_random_checkpoint(work / "tuned", seed=1, shape=TINY_SHAPE),
            "untuned": write_random_checkpoint(work / "untuned", seed=2, shape=TINY_SHAPE),
        }
        engines = {n: ModelEngine(ModelSpec(name=n, path=str(p))) for n, p in paths.items()}
        tokenizer = load_tokenizer(str(paths["proposer"]))
        coord = Coordinator(engines, {n: tokenizer for n in engines})
        cbs = {"width": W, "successors": K, "chunk_len": L}
        bon = {"width": 1, "successors": W * K, "chunk_len": None}
        guide_models = {g: load_checkpoint(ModelSpec(name=g, path=str(paths[g])))[0]
                        for g in ("tuned", "untuned")}  # fmt: skip
        try:
            await ours(coord, engines, cbs, 16)  # warm up
            times: dict[str, list[float]] = {"cbs": [], "bon": []}
            for _ in range(args.repeats):  # interleaved: load changes hit both alike
                cbs_texts, t, cbs_guides, cbs_tokens = await ours(coord, engines, cbs,
                                                                  args.new_tokens)  # fmt: skip
                times["cbs"].append(t)
                _, t, _, bon_tokens = await ours(coord, engines, bon, args.new_tokens)
                times["bon"].append(t)
            ref_texts, ref_guides = {}, 0
            for prompt in PROMPTS:
                run = reference(engines["proposer"], guide_models, tokenizer, prompt,
                                args.new_tokens)  # fmt: skip
                ref_texts[prompt], n = await run
                ref_guides += n
        finally:
            for e in engines.values():
                await e.shutdown()
    cbs_s, bon_s = statistics.median(times["cbs"]), statistics.median(times["bon"])
    key = f"guide_tokens_full_vs_incremental_{args.new_tokens}"
    return {
        "new_tokens": args.new_tokens, "prompts": len(PROMPTS), "W": W, "K": K, "L": L,
        "guide_tokens": {"full_rescore": ref_guides, "incremental": cbs_guides},
        key: round(ref_guides / cbs_guides, 2),
        "seconds": {"cbs": round(cbs_s, 2), "bon": round(bon_s, 2)},
        "proposer_tokens": {"cbs": cbs_tokens, "bon": bon_tokens},
        "cbs_vs_bon_time": round(cbs_s / bon_s, 3),
        # the same per proposer token: an end token ends some samples early
        "cbs_vs_bon_time_per_token": round(cbs_s / cbs_tokens / (bon_s / bon_tokens), 3),
        "same_text": cbs_texts == ref_texts,
        "targets": {key: ">= 5", "cbs_vs_bon_time": "<= 1.3"},
    }  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    out = asyncio.run(main_async(args))
    key = f"guide_tokens_full_vs_incremental_{args.new_tokens}"
    print(f"{'figure':<40} {'value':>10}  target")
    print(f"{key:<40} {out[key]:>10}  >= 5")
    print(f"{'cbs_vs_bon_time':<40} {out['cbs_vs_bon_time']:>10}  <= 1.3")
    print(f"{'cbs_vs_bon_time_per_token':<40} {out['cbs_vs_bon_time_per_token']:>10}  <= 1.3")
    print(f"{'proposer tokens (cbs / bon)':<40} "
          f"{out['proposer_tokens']['cbs']:>5} / {out['proposer_tokens']['bon']}")  # fmt: skip
    print(f"{'same_text (ours = full re-score)':<40} {str(out['same_text']):>10}  True")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
