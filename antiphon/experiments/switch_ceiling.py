"""How far a switcher that cannot tell one entity from another can get, on the oracle's dev
labels: the evidence for what limits Switch Generation on the fact tasks of the zoo.

The zoo's fact tasks ask about entities outside the SFT data, and dev and test hold disjoint
halves of them, so a switcher meets every test entity for the first time. Whether a model
writes an entity's name or value right depends on the entity (sft restates most names but
mangles some; base knows the values but in the Q/A form also slips), which a switcher reading
only the text can learn for its training entities at best. This measures the ceiling of a
policy that sees the answer so far with every entity name, fact value and number masked:

1. every labelled state of the oracle's search (`runs/switch/oracle-labels`) is keyed by its
   task and its masked answer text;
2. per key, the policy picks the model right at the most states of that key (fitted on the
   same states it is then scored on: in-sample, so an upper bound for such a policy);
3. each dev question is walked from the empty answer along the oracle's tree by that policy;
   it is solved when every pick is right and the last right segment ends the answer.

    python -m antiphon.experiments.switch_ceiling --labels runs/switch/oracle-labels

prints, per task, the questions this masked policy solves against those the oracle solves.
Tasks whose deciding words are not names (safety: the request's verb and object) are out of
its reach by construction, and there the figure bounds nothing. Nor is it a bound on every
switcher: a switcher also reads who wrote each segment so far, and letters of a name may hint
at how a model treats it. It is what the masked text alone allows.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence

from antiphon.training.rollouts import RolloutExample, RolloutStore

NAME = re.compile(r"\b[A-Z][a-z]{2,}\b")
NOT_NAMES = frozenset({"What", "Who", "How", "When", "Which", "Where", "The", "Add", "And"})


def names_of(*texts: str) -> list[str]:
    """The capitalised words of `texts` that name things (entities, values), longest first."""
    found = {w for text in texts for w in NAME.findall(text)} - NOT_NAMES
    return sorted(found, key=lambda w: (-len(w), w))


def masked(text: str, names: Sequence[str]) -> str:
    """`text` with each name, a name cut short at its end, and every number masked."""
    for name in names:
        text = text.replace(name, "<name>")
    for name in names:  # an answer cut mid-name: the segment boundary falls inside it
        for k in range(len(name) - 1, 0, -1):
            if text.endswith(" " + name[:k]):
                text = text[:-k] + "<part>"
                break
    return re.sub(r"\d+", "<number>", text)


def answer_text(ex: RolloutExample) -> str:
    return "".join(text for _, text in ex.prefix)


def blind_policy(
    examples: Iterable[RolloutExample], key: Mapping[str, Hashable]
) -> dict[Hashable, int]:
    """Per key (`key[example.key]`), the model right at the most of its states."""
    right: dict[Hashable, Counter] = defaultdict(Counter)
    for ex in examples:
        right[key[ex.key]].update(ex.best)
    return {k: min(c, key=lambda m: (-c[m], m)) for k, c in right.items()}


def near_end(state: RolloutExample, reference: str, segment_chars: int) -> bool:
    """Whether a right segment at `state` can end the answer: one is right, and at most one
    segment of the reference is left to write."""
    return bool(state.best) and len(reference) - len(answer_text(state).strip()) <= segment_chars


def walk(states: Mapping[str, RolloutExample], choose, reference: str, segment_chars: int) -> bool:
    """Whether `choose(state) -> model` answers right from the empty answer along the
    oracle's tree (`states`: one question's labelled states by their answer text)."""
    state = states.get("")
    while state is not None:
        pick = choose(state)
        if pick not in state.best:
            return False
        children = [s for s in states.values() if s.prefix and s.prefix[:-1] == state.prefix]
        if not children:  # the pick's right segment ended the answer, or the search stopped
            return near_end(state, reference, segment_chars)
        # the pick's text went on as one of the children: the one tagged with it, if any is
        state = min(children, key=lambda s: s.prefix[-1][0] != pick)
    return False


def ceiling(
    examples: Sequence[RolloutExample], references: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """Per task: questions, those the oracle's tree answers whole, and those the masked
    policy answers (`references`: query key -> its right answer)."""
    by_question: dict[str, dict[str, RolloutExample]] = defaultdict(dict)
    key = {}
    for ex in examples:
        answer = answer_text(ex)
        key[ex.key] = (ex.task, masked(answer, names_of(ex.query, references[ex.query_key])))
        by_question[ex.query_key][answer] = ex
    policy = blind_policy(examples, key)
    out: dict[str, dict[str, int]] = {}
    for question, states in sorted(by_question.items()):
        reference = references[question]
        row = out.setdefault(states[next(iter(states))].task,
                             {"questions": 0, "oracle": 0, "masked": 0})  # fmt: skip
        row["questions"] += 1
        segment_chars = max((len(t) for s in states.values() for _, t in s.prefix), default=0)
        row["oracle"] += any(near_end(s, reference, segment_chars) for s in states.values())
        row["masked"] += walk(states, lambda s: policy[key[s.key]], reference, segment_chars)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    from antiphon.zoo.evaluate import zoo_tasks
    from antiphon.zoo.tasks import COMPOSITIONAL_TASKS, CORE_TASKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", default="runs/switch/oracle-labels", help="an oracle-label store")
    args = p.parse_args(argv)
    dev = zoo_tasks("dev", list(CORE_TASKS + COMPOSITIONAL_TASKS))
    references = {f"{name}:{i}": item.reference
                  for name, task in dev.items() for i, item in enumerate(task.items)}  # fmt: skip
    table = ceiling(RolloutStore(args.labels).examples(), references)
    print("| task | dev questions | oracle | masked-entity policy (in-sample) |")
    print("|---|---:|---:|---:|")
    for task, row in table.items():
        print(f"| {task} | {row['questions']} | {row['oracle']} | {row['masked']} |")
    return table


if __name__ == "__main__":
    main()
