"""One table of every benchmark's headline ratio against its target, and the plot of tokens/s
against segment length, from the figures the benchmarks last wrote (run them first; this
measures nothing itself).

    python benchmarks/summary.py    # prints the table; writes benchmarks/results/summary.md
                                    # and benchmarks/results/segments.png

Each figure comes from one run of its benchmark (ratios measured in the same run); the
table names the file. `segments.png`: tokens/s of round robin against the segment length in
`collab.json`, ours deployed (one deployment per model, over HTTP), ours colocated (over
HTTP) and the reference approach (switch_generation's re-prefilling writer loop, in process),
each with its single model as a dashed line.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# (benchmark file, figure (dots walk into nested objects), what it is, the least value that
# meets its target or None)
ROWS = [
    ("collab", "roundrobin_seg32_vs_single", "round robin, segments of 32 / one model", 0.95),
    ("collab", "roundrobin_seg8_vs_single", "round robin, segments of 8 / one model", 0.85),
    ("collab", "colocated_roundrobin_seg32_vs_single", "the same, colocated", 0.95),
    ("collab", "colocated_roundrobin_seg8_vs_single", "the same, colocated", 0.85),
    ("collab", "details.layouts.deployments.marginal_turn_ms", "one more turn, ms", None),
    ("collab", "details.layouts.colocated.marginal_turn_ms", "the same, colocated", None),
    ("hops", "hop_ms", "a one-token generate, deployed (direct channel) - in process, ms", None),
    ("hops", "serve_hop_ms", "the same through Serve (as autoscaled models go), ms", None),
    (
        "hops_throughput_optimized",
        "serve_hop_ms",
        "the same, RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
        None,
    ),
    ("collab", "roundrobin_seg8_vs_reference", "round robin seg 8 / the reference's", None),
    ("switch", "switch_vs_single", "switch (switcher included, seg 32) / one model", 0.9),
    ("switch", "switch_no_speculation_vs_single", "the same, speculation off", None),
    ("switch", "colocated_switch_vs_single", "the same, colocated", 0.9),
    ("switch", "switch_vs_reference_256", "switch / switch_generation's loop, 256 tokens", 3),
    ("deferral", "defer_vs_single", "Co-LLM deferral at ~10% / the base alone", 0.8),
    ("deferral", "defer_vs_reprefill_256", "deferral / co-llm's loop, 256 tokens", 5),
    ("search", "guide_tokens_full_vs_incremental_256", "guide cost: full re-score / ours", 5),
    ("engine", "concurrent8_vs_1", "8 sessions / 1 session, tokens/s", 3),
    ("engine", "engine_vs_generate_b1", "engine / HF generate, batch 1", None),
]


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def figure(data: dict, key: str) -> float | None:
    """data[key]; a dotted key walks nested objects."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def table() -> str:
    lines = ["| figure | what | value | target | met |", "|---|---|---|---|---|"]
    for bench, key, what, target in ROWS:
        value = figure(load(bench), key)
        shown = "not run" if value is None else f"{value:.2f}"
        want = "" if target is None else f">= {target}"
        met = "" if target is None or value is None else ("yes" if value >= target else "no")
        lines.append(f"| `{bench}.{key}` | {what} | {shown} | {want} | {met} |")
    return "\n".join(lines)


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collab = load("collab")
    details = collab["details"]
    segments = sorted(int(k.removeprefix("roundrobin_seg"))
                      for k in details["reference_tokens_per_s"] if k != "single")  # fmt: skip
    series = {
        "ours, one deployment per model (HTTP)": details["layouts"]["deployments"]["tokens_per_s"],
        "ours, colocated (HTTP)": details["layouts"]["colocated"]["tokens_per_s"],
        "reference: re-prefill per segment (in process)": details["reference_tokens_per_s"],
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (label, tps), colour in zip(series.items(), ("C0", "C1", "C2"), strict=True):
        ax.plot(segments, [tps[f"roundrobin_seg{s}"] for s in segments], "o-", color=colour,
                label=label)  # fmt: skip
        ax.axhline(tps["single"], color=colour, linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(segments, [str(s) for s in segments])
    ax.set_xlabel("segment length (tokens per turn)")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"Round robin of two models, {details['max_tokens']} tokens (dashed: one model)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    text = table()
    print(text)
    (RESULTS / "summary.md").write_text(text + "\n")
    plot(RESULTS / "segments.png")
    print(f"wrote {RESULTS / 'summary.md'} and {RESULTS / 'segments.png'}")


if __name__ == "__main__":
    main()
