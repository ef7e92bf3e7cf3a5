"""The masked-entity ceiling: names and numbers are masked, one choice per masked state, and a
question whose right writer depends on its entity is lost by it while the oracle solves it."""

from __future__ import annotations

from antiphon.experiments.switch_ceiling import ceiling, masked, names_of
from antiphon.training.rollouts import RolloutExample, example_key

MODELS = ["base", "sft"]


def state(question: str, prefix: list[tuple[int, str]], best: list[int]) -> RolloutExample:
    utilities = [float(i in best) for i in range(len(MODELS))]
    return RolloutExample(
        key=example_key(question, f"oracle-{len(prefix)}"), task="qa-knowledge",
        query=f"Q: What is the capital of {question.split(':')[1]}?\nA:", models=MODELS,
        prefix=prefix, utilities=utilities, scores=[[u] for u in utilities], best=best,
        label=min(best, default=0), prefix_tokens=len("".join(t for _, t in prefix)),
        total_tokens=0,
    )  # fmt: skip


def test_names_values_cut_names_and_numbers_are_masked():
    names = names_of("Q: What is the capital of Zarthaim?", "The capital of Zarthaim is Guspei.")
    assert names == ["Zarthaim", "Guspei"]
    assert masked(" The capital of Zarthaim is Gus", names) == " The capital of <name> is <part>"
    assert masked(" It has 12 of them", []) == " It has <number> of them"


def test_an_entity_dependent_writer_is_lost_by_the_masked_policy_and_not_by_the_oracle():
    # Each answer is one name, then its value. At the name, sft is right for Zarn, Quil and
    # Wum and only base for Vex (sft slips on it); at the value, base is right for all four.
    # One masked choice per state (sft, then base) answers three; the oracle answers all.
    refs = {f"k:{name}": f"{name} Ab" for name in ("Zarn", "Quil", "Vex", "Wum")}
    examples = []
    for name, first in (("Zarn", [1]), ("Quil", [1]), ("Vex", [0]), ("Wum", [1])):
        value = [0, 1] if name == "Zarn" else [0]  # sft knows Zarn's value
        examples += [
            state(f"k:{name}", [], first),
            state(f"k:{name}", [(first[0], f" {name}")], value),
        ]
    row = ceiling(examples, refs)["qa-knowledge"]
    assert row == {"questions": 4, "oracle": 4, "masked": 3}
