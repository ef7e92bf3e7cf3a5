"""Switch Generation's speed: what the learned switcher costs against one model alone, and
against the reference implementation's way of decoding.

    python benchmarks/switch.py     # prints a table, writes benchmarks/results/switch.json
    python benchmarks/switch.py --new-tokens 64 --repeats 1     # quicker

On a private local Ray: two random-weight writer checkpoints of one shape (the deferral
benchmark's: on two CPU cores a token costs ~10 ms, the order of an 8B model's on a GPU; they
rarely write an end token, so every run writes its whole budget) as model deployments, the
coordinator deployment over them, and a random-weight switcher of the same shape in its own
deployment behind a policy actor running `switch`. Greedy, same prompts, requests one at a
time through the coordinator's handle, timed for:
- single: one model writes everything (`fixed`, segments of 32);
- switch: the switcher picks the writer of every 32-token segment (one switcher call each),
  with speculative continuation (the last writer drafts the next segment while the switcher
  decides; kept when it is chosen again: `details.runs.switch.kept` of `decisions`);
- switch_no_speculation: the same with `speculate: false`;
- colocated_single, colocated_switch: single and switch with the writers colocated
  (`colocate=True`: the coordinator replica runs them, no model deployments) and the switcher
  in the coordinator's process too.
And, in this process with the same checkpoints, the reference approach written faithfully
(BunsenFeng/switch_generation's `switch_generation`): every round the selector *generates*
up to a segment's tokens with `generate` from its prompt rebuilt as text (query and tagged
segments) and the first index digit in its answer picks the writer (none: the last model);
the writer then runs `generate` for one segment on the whole text so far, re-tokenised and
re-prefilled, and the decoded segment is appended with a space. Left out in its favour: the
reference starts a multiprocessing pool per round and pickles the models into it.
Ratios from the same run:
- `switch_vs_single` = tokens/s of switch / tokens/s of single (target >= 0.9);
  `colocated_switch_vs_single` the same colocated;
- `switch_vs_reference_256` = tokens/s of switch / tokens/s of the reference (target >= 3);
  `switch_vs_reference_1_token_selector_256`: the same against a kinder reference whose
  selector generates one token only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from antiphon.checkpoint import load_checkpoint
from antiphon.config import ModelSpec
from antiphon.zoo.random_model import write_random_checkpoint
from antiphon.zoo.train import ModelShape

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private throwaway cluster

PROMPTS = (
    "Once upon a time",
    "The fox went to the river and",
    "Q: What is the capital of",
    "In the village there was",
)
SEGMENT = 32
# The deferral benchmark's shape; a context that holds the selector's prompt at 256 tokens.
SHAPE = ModelShape(hidden=512, layers=8, heads=8, context=1024)
RESULTS = Path(__file__).parent / "results" / "switch.json"
# The reference selector prompt's question (switch_generation.py: selector_model_prompt).
REFERENCE_ASK = (
    " Which model should generate the next segment? Please respond with a number from 0 to "
    "{last}. The answer is model "
)


def checkpoints(work: Path) -> dict[str, str]:
    """Two writers and the switcher: random weights, one shape, distinct seeds."""
    return {name: str(write_random_checkpoint(work / name, seed=seed, shape=SHAPE))
            for seed, name in enumerate(("first", "second", "switcher"))}  # fmt: skip


def time_policy(handle, models, policy, params, max_tokens) -> dict[str, float]:
    """Every prompt once through the coordinator's handle: tokens, seconds, segments."""
    from antiphon.coordinator.request import GenerationRequest

    tokens, segments, kept, seconds = 0, 0, 0, 0.0
    for prompt in PROMPTS:
        request = GenerationRequest(prompt=prompt, models=models, policy=policy,
                                    policy_params=params, max_tokens=max_tokens)  # fmt: skip
        t0 = time.perf_counter()
        result = handle.generate.remote(request).result()
        seconds += time.perf_counter() - t0
        tokens += result.usage.completion_tokens
        segments += len(result.segments)
        writers = [s.model for s in result.segments]
        kept += sum(a == b for a, b in itertools.pairwise(writers))  # the writer stayed
    return {"tokens": tokens, "seconds": seconds, "segments": segments, "kept": kept,
            "decisions": segments - len(PROMPTS)}  # fmt: skip


def serving_runs(paths: dict[str, str], new_tokens: int, repeats: int) -> dict[str, dict]:
    """single and switch over the serving stack, one deployment per model and colocated,
    interleaved so that drift in the shared machine's load hits all alike."""
    import ray
    from ray import serve

    from antiphon.deploy.app import build_coordinator_app
    from antiphon.deploy.switcher import deploy_switch_policy, switch_policy_params

    writers = ("first", "second")
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        spec = ModelSpec(name="switcher-model", path=paths["switcher"])
        actor = deploy_switch_policy(spec, {"segment_len": SEGMENT})
        specs = [ModelSpec(name=n, path=paths[n]) for n in writers]
        deployed = serve.run(build_coordinator_app(specs, None, {"switch": actor}),
                             name="bench", route_prefix=None)  # fmt: skip
        colocated = serve.run(build_coordinator_app(specs, colocate=True),
                              name="bench-colocated", route_prefix=None)  # fmt: skip
        single = ("fixed", {"model": writers[0], "segment_len": SEGMENT})
        # colocated, the switcher runs in the coordinator's process too (no deployment)
        in_process = {"switcher_path": paths["switcher"], "segment_len": SEGMENT}
        configs = {
            "single": (deployed, *single),
            "switch": (deployed, "switch", switch_policy_params(spec, {"segment_len": SEGMENT})),
            "switch_no_speculation": (
                deployed, "switch",
                switch_policy_params(spec, {"segment_len": SEGMENT, "speculate": False}),
            ),
            "colocated_single": (colocated, *single),
            "colocated_switch": (colocated, "switch", in_process),
        }  # fmt: skip
        for handle, policy, params in configs.values():  # warm up: sessions, switcher builds
            time_policy(handle, writers, policy, params, SEGMENT)
        runs = {name: [] for name in configs}
        for _ in range(repeats):
            for name, (handle, policy, params) in configs.items():
                runs[name].append(time_policy(handle, writers, policy, params, new_tokens))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {name: total(rows) for name, rows in runs.items()}


def total(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {key: sum(r[key] for r in rows) for key in rows[0]}
    return {**out, "seconds": round(out["seconds"], 3),
            "tokens_per_s": round(out["tokens"] / out["seconds"], 1)}  # fmt: skip


def reference_selector_prompt(query: str, segments: list[tuple[int, str]], n: int) -> str:
    """The reference's selector prompt: the query, each segment between its writer's tags."""
    tagged = "".join(f" <model {i} begins> {text} <model {i} ends>" for i, text in segments)
    return query + tagged + REFERENCE_ASK.format(last=n - 1)


def hf_generate(model, tokenizer, text: str, max_new_tokens: int) -> tuple[str, int]:
    """One `generate` call on the text, tokenised afresh (greedy): the new text, its length."""
    inputs = tokenizer(text, return_tensors="pt")
    out = model.generate(inputs.input_ids, attention_mask=inputs.attention_mask,
                         max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    new = out[0, inputs.input_ids.shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@torch.no_grad()
def reference(paths: dict[str, str], new_tokens: int, selector_tokens: int) -> dict[str, float]:
    """The reference loop over every prompt: per round the selector generates, the chosen
    writer re-reads the whole text and writes one segment."""
    writers = [load_checkpoint(ModelSpec(name=n, path=paths[n])) for n in ("first", "second")]
    selector, selector_tokenizer = load_checkpoint(ModelSpec(name="s", path=paths["switcher"]))
    tokens, seconds = 0, 0.0
    for prompt in PROMPTS:
        segments: list[tuple[int, str]] = []
        sequence = ""
        t0 = time.perf_counter()
        for _ in range(new_tokens // SEGMENT):
            ask = reference_selector_prompt(prompt, segments, len(writers))
            answer, _ = hf_generate(selector, selector_tokenizer, ask, selector_tokens)
            chosen = next((j for j in range(len(writers)) if str(j) in answer), len(writers) - 1)
            model, tokenizer = writers[chosen]
            text, count = hf_generate(model, tokenizer, prompt + " " + sequence, SEGMENT)
            segments.append((chosen, text))
            sequence += text + " "
            tokens += count
        seconds += time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="antiphon-switch-bench-") as tmp:
        paths = checkpoints(Path(tmp))
        runs = serving_runs(paths, args.new_tokens, args.repeats)
        reference(paths, SEGMENT, 1)  # warm up
        runs["reference"] = reference(paths, args.new_tokens, SEGMENT)
        runs["reference_1_token_selector"] = reference(paths, args.new_tokens, 1)
    n = args.new_tokens
    switch = runs["switch"]["tokens_per_s"]
    ratios = {
        "switch_vs_single": round(switch / runs["single"]["tokens_per_s"], 3),
        "switch_no_speculation_vs_single": round(
            runs["switch_no_speculation"]["tokens_per_s"] / runs["single"]["tokens_per_s"], 3
        ),
        "colocated_switch_vs_single": round(
            runs["colocated_switch"]["tokens_per_s"] / runs["colocated_single"]["tokens_per_s"], 3
        ),
        f"switch_vs_reference_{n}": round(switch / runs["reference"]["tokens_per_s"], 2),
        f"switch_vs_reference_1_token_selector_{n}": round(
            switch / runs["reference_1_token_selector"]["tokens_per_s"], 2
        ),
    }
    targets = {"switch_vs_single": ">= 0.9", f"switch_vs_reference_{n}": ">= 3"}
    out = {**ratios, "targets": targets, "details": {
        "shape": vars(SHAPE), "segment_len": SEGMENT, "new_tokens": n, "prompts": len(PROMPTS),
        "repeats": args.repeats, "runs": runs, "cpu_count": os.cpu_count(),
        "switch_policy_in": "policy actor (colocated: the coordinator)"}}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'run':<28} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for name, row in runs.items():
        print(f"{name:<28} {row['tokens']:>7} {row['seconds']:>8} {row['tokens_per_s']:>8}")
    for key, value in ratios.items():
        print(f"{key:<44} {value:>7}  {targets.get(key, '')}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
