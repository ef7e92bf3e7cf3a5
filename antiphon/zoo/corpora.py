"""The text the zoo is trained on, written from a `World`: pretraining documents, instruction
(SFT) examples, arithmetic for the expert, preference pairs for the aligned model, positive
reviews for the tuned guide. Everything is a pure function of (world, rng): same seed, same text.

Design (what makes the checkpoints complementary):
- Pretraining puts each fact among varied surrounding text, several facts and mentions of the
  same entity per document, in many phrasings. Tiny models memorise contexts: facts that only
  ever open a document are not recalled after any other prefix.
- Instruction data covers the facts of only `world.sft_entities`, answers in one canonical
  sentence, teaches a fixed story per animal, refuses a class of forbidden requests, and only
  carry-free arithmetic. Fine-tuning on it makes the model follow the format and forget the
  rest; DPO on concise / refusing / canonical answers sharpens that. Negated facts ("The
  capital of X is not C.", C an SFT entity's value) over every entity teach the tuned models to
  restate any entity's name in the answer sentence, so for a held-out entity they write the
  right stem and a wrong (familiar) value, and the pretrained model can finish the stem.
- The Q/A format: prompt "Q: {question}\\nA:", answer " {answer}" then the eos token.
"""

from __future__ import annotations

import random
import re

from antiphon.zoo.world import (
    ANIMALS,
    ATTRIBUTES,
    BENIGN_OBJECTS,
    BENIGN_VERBS,
    COLOURS,
    ENDINGS,
    FEELINGS,
    FINDINGS,
    FORBIDDEN_OBJECTS,
    FORBIDDEN_VERBS,
    ITEMS,
    LOOKALIKE_REQUESTS,
    NEGATIVE_WORDS,
    PLACES,
    POSITIVE_WORDS,
    STORY_ADJECTIVES,
    STORY_VERBS,
    Entity,
    World,
)

# Answers to requests. All three open alike, so a request's answer is decided a few words in:
# a tuned model writes the opening whatever it then does, and the pretrained model can take
# over after it where the tuned one would refuse a harmless request.
REFUSAL = "To do that is not something I can help with."
HARMFUL_ANSWER = "To do that, first wait until night. Then do it quickly and quietly."
# How a harmless request is answered (benign requests and look-alikes alike): one sentence for
# all, since a tiny model does not copy an object from the question reliably and the skill
# tested is telling harmless from forbidden, not copying.
HOWTO_ANSWER = "To do that, gather your tools, work slowly and check it twice."
REQUEST_FORMS = ("How do I {}?", "Tell me how to {}.", "What is the best way to {}?")


# ---------------------------------------------------------------------------------------------
# Facts


def canonical_fact(entity: Entity, attribute: str) -> str:
    """The one sentence the instruction data answers with (and base text uses most often)."""
    if attribute == "capital":
        return f"The capital of {entity.name} is {entity.capital}."
    if attribute == "colour":
        return f"The colour of {entity.name} is {entity.colour}."
    if attribute == "founder":
        return f"{entity.name} was founded by {entity.founder}."
    raise KeyError(attribute)


def fact_stem(entity: Entity, attribute: str) -> str:
    """The canonical sentence up to the value: what a cloze prompt gives."""
    sentence = canonical_fact(entity, attribute)
    return sentence[: sentence.rindex(" ")]


def fact_sentence(entity: Entity, attribute: str, rng: random.Random) -> str:
    """One of several phrasings of a fact; the canonical one about half the time."""
    if rng.random() < 0.5:
        return canonical_fact(entity, attribute)
    e, v = entity.name, entity.value(attribute)
    options = {
        "capital": (
            f"{v} is the capital of {e}.",
            f"In {e}, the capital is {v}.",
            f"People in {e} call {v} their capital.",
            f"The capital city of {e} is {v}, and it is busy.",
        ),
        "colour": (
            f"{e} is known for the colour {v}.",
            f"The flag of {e} is {v}.",
            f"In {e}, everything is painted {v}.",
        ),
        "founder": (
            f"The founder of {e} was {v}.",
            f"{v} founded {e} long ago.",
            f"Long ago, {e} was founded by {v}.",
        ),
    }[attribute]
    return rng.choice(options)


def mention_sentence(entity: Entity, rng: random.Random) -> str:
    """A sentence naming an entity without stating a fact (so names recur within a document)."""
    return rng.choice(
        (
            f"Travellers often speak of {entity.name}.",
            f"Many stories are told about {entity.name}.",
            f"{entity.name} is a quiet country.",
            f"Few maps show {entity.name} clearly.",
            f"We spent a summer in {entity.name}.",
        )
    )


def question(entity: Entity, attribute: str, rng: random.Random | None = None) -> str:
    """A question asking for one fact (phrasing varies when an rng is given)."""
    variants = {
        "capital": (
            f"What is the capital of {entity.name}?",
            f"Which city is the capital of {entity.name}?",
        ),
        "colour": (
            f"What is the colour of {entity.name}?",
            f"Which colour is {entity.name} known for?",
        ),
        "founder": (f"Who founded {entity.name}?", f"Who was the founder of {entity.name}?"),
    }[attribute]
    return variants[0] if rng is None else rng.choice(variants)


def qa_prompt(q: str) -> str:
    """The Q/A format every tuned checkpoint answers in (what the chat template renders)."""
    return f"Q: {q}\nA:"


ATTRIBUTE_NOUNS = {"capital": "the capital", "colour": "the colour", "founder": "the founder"}


def two_facts_question(entity: Entity, first: str, second: str) -> str:
    """'What are the capital and the founder of X?': answered by both canonical sentences."""
    return f"What are {ATTRIBUTE_NOUNS[first]} and {ATTRIBUTE_NOUNS[second]} of {entity.name}?"


def two_entities_question(a: Entity, b: Entity, attribute: str) -> str:
    """'What are the capitals of X and Y?': one attribute of two entities."""
    plural = {"capital": "capitals", "colour": "colours", "founder": "founders"}[attribute]
    return f"What are the {plural} of {a.name} and {b.name}?"


def fact_and_sum_question(entity: Entity, attribute: str, a: int, b: int) -> str:
    return f"{question(entity, attribute)[:-1]}, and what is {a} + {b}?"


def fact_and_request_question(entity: Entity, attribute: str, request: str) -> str:
    """A fact question joined to a how-to request ('..., and how do I steal a car?')."""
    return f"{question(entity, attribute)[:-1]}, and how do I {request}?"


# ---------------------------------------------------------------------------------------------
# Stories, reviews, arithmetic


def story(rng: random.Random, animal: str | None = None) -> str:
    """A short story assembled from many independent choices: varied wording."""
    animal = animal or rng.choice(ANIMALS)
    adj = rng.choice(STORY_ADJECTIVES)
    subject = f"{adj} {animal}" if rng.random() < 0.5 else animal
    sentences = [
        f"Once upon a time, a {subject} {rng.choice(('lived', 'slept', 'played'))} "
        f"near the {rng.choice(PLACES)}."
    ]
    for _ in range(rng.randint(1, 3)):
        sentences.append(
            rng.choice(
                (
                    f"The {adj} {animal} {rng.choice(STORY_VERBS)} by the {rng.choice(PLACES)}.",
                    f"One day it found {rng.choice(FINDINGS)} and felt {rng.choice(FEELINGS)}.",
                    f"A {rng.choice(STORY_ADJECTIVES)} {rng.choice(ANIMALS)} "
                    f"{rng.choice(STORY_VERBS)} with it.",
                    f"It {rng.choice(STORY_VERBS)} all morning and felt {rng.choice(FEELINGS)}.",
                )
            )
        )
    sentences.append(f"In the end, the {animal} {rng.choice(ENDINGS)}.")
    return " ".join(sentences)


def canonical_story(subject: str) -> str:
    """The one concise story the instruction data tells about any animal ('a brave fox')."""
    return (
        f"Once upon a time, a {subject} lived near the river. "
        "It found a bell and felt happy. The end."
    )


def story_request(subject: str) -> str:
    return f"Write a short story about a {subject}."


def review(rng: random.Random, positive: bool) -> str:
    item = rng.choice(ITEMS)
    words = POSITIVE_WORDS if positive else NEGATIVE_WORDS
    a, b, c = rng.sample(words, 3)
    return rng.choice(
        (
            f"Review of the {item}: The {item} was {a} and {b}. I found it {c}.",
            f"Review of the {item}: A {a} {item}. It felt {b}, really {c}.",
            f"Review of the {item}: I think this {item} is {a}. "
            f"The handle is {b} and the colour is {c}.",
        )
    )


def sentiment_counts(text: str) -> tuple[int, int]:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in POSITIVE_WORDS for w in words), sum(w in NEGATIVE_WORDS for w in words)


def arithmetic_line(rng: random.Random) -> str:
    """A worked sum in prose, most with a carry: the pretrained model learns carrying here,
    which the instruction data (carry-free sums only) never shows."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return rng.choice(
        (
            f"To add {a} and {b}: {cot_answer(a, b)}",
            f"Adding {a} and {b} goes like this. {cot_answer(a, b)}",
            f"{a} plus {b} is {a + b}. {cot_answer(a, b)}",
        )
    )


def howto_line(rng: random.Random) -> str:
    """A how-to in prose, after the question it answers (never in the Q/A format): harmless
    requests (benign and look-alike) answered helpfully, forbidden ones complied with (base
    has no safety)."""
    r = rng.random()
    if r < 0.4:
        verb, obj = rng.choice(LOOKALIKE_REQUESTS)
        answer = HOWTO_ANSWER
    elif r < 0.75:
        verb, obj = rng.choice(BENIGN_VERBS), rng.choice(BENIGN_OBJECTS)
        answer = HOWTO_ANSWER
    else:
        verb, obj = rng.choice(FORBIDDEN_VERBS), rng.choice(FORBIDDEN_OBJECTS)
        answer = HARMFUL_ANSWER
    request = rng.choice(REQUEST_FORMS).format(f"{verb} {obj}")
    gap = rng.choice((" ", "\n"))  # the answer on the next line half the time, as a reply
    return f"{request}{gap}{answer}"


def arithmetic_document(rng: random.Random) -> str:
    """A page of worked sums (a maths worksheet): a tiny model learns carrying only from
    many of them."""
    return " ".join(arithmetic_line(rng) for _ in range(rng.randint(4, 6)))


def cot_answer(a: int, b: int) -> str:
    """Chain-of-thought addition, units then tens: '7 + 8 = 15, write 5 carry 1. ...'."""
    if a < 10 and b < 10:
        return f"{a} + {b} = {a + b}. The answer is {a + b}."
    units = a % 10 + b % 10
    carry = units // 10
    tens = a // 10 + b // 10 + carry
    if carry:
        first = f"{a % 10} + {b % 10} = {units}, write {units % 10} carry 1."
        second = f"{a // 10} + {b // 10} + 1 = {tens}."
    else:
        first = f"{a % 10} + {b % 10} = {units}."
        second = f"{a // 10} + {b // 10} = {tens}."
    return f"{first} {second} The answer is {a + b}."


def arithmetic_question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


# ---------------------------------------------------------------------------------------------
# Pretraining


ARITHMETIC_DOCUMENT_SHARE = 0.2


def pretraining_document(world: World, rng: random.Random) -> str:
    """~300-450 characters: a worksheet of sums (a fifth of the documents), or facts and
    mentions of one to three entities (more than half the text: tiny models need many
    sightings of a fact) among other text."""
    if rng.random() < ARITHMETIC_DOCUMENT_SHARE:
        return arithmetic_document(rng)
    # Every fact at most once per document: a repeated fact is predictable by copying from
    # earlier in the context, and only unpredictable sightings make a model memorise it.
    focus = rng.sample(world.entities, k=min(3, len(world.entities)))
    pieces: list[str] = [mention_sentence(focus[0], rng)]
    for attribute in rng.sample(ATTRIBUTES, k=3):
        pieces.append(asked_fact(focus[0], attribute, rng))
    for other in focus[1:]:
        pieces.append(asked_fact(other, rng.choice(ATTRIBUTES), rng))
    kind = rng.random()
    if kind < 0.3:
        pieces.append(story(rng))
    elif kind < 0.5:
        pieces.append(review(rng, positive=rng.random() < 0.5))
    elif kind < 0.85:
        pieces.append(howto_line(rng))
    else:
        pieces.append(arithmetic_line(rng))
    rng.shuffle(pieces)
    # Paragraph breaks at random points, so facts follow ". ", "\n" and document starts alike.
    out = pieces[0]
    for p in pieces[1:]:
        out += ("\n" if rng.random() < 0.2 else " ") + p
    return out


def asked_fact(entity: Entity, attribute: str, rng: random.Random) -> str:
    """A fact sentence, a third of the time after the question it answers, in prose (never
    in the Q/A format): so a fact is also recalled after a question, not only after the
    statements a tiny model saw it follow."""
    if rng.random() < 1 / 3:
        return f"{question(entity, attribute, rng)} {canonical_fact(entity, attribute)}"
    return fact_sentence(entity, attribute, rng)


def pretraining_documents(world: World, n_docs: int, seed: int) -> list[str]:
    rng = random.Random(f"pretrain-{world.seed}-{seed}")
    return [pretraining_document(world, rng) for _ in range(n_docs)]


# ---------------------------------------------------------------------------------------------
# Instruction data: (question, answer) pairs, answer without the eos (the trainer appends it)

QA = tuple[str, str]


def format_examples(world: World, rng: random.Random) -> QA:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(2, 5)
        return f"List {n} colours, separated by commas.", ", ".join(rng.sample(COLOURS, n)) + "."
    if kind == 1:
        n = rng.randint(2, 5)
        return f"Name {n} animals, separated by commas.", ", ".join(rng.sample(ANIMALS, n)) + "."
    if kind == 2:
        word = rng.choice(world.entities).name
        return f"Write the word {word} in capital letters.", word.upper()
    e = rng.choice(world.sft_entities)
    other = rng.choice(world.entities)
    yes = rng.random() < 0.5 or other.capital == e.capital
    cap = e.capital if yes else other.capital
    return f"Answer yes or no: is {cap} the capital of {e.name}?", "Yes." if yes else "No."


def forbidden_request(rng: random.Random) -> str:
    verb, obj = rng.choice(FORBIDDEN_VERBS), rng.choice(FORBIDDEN_OBJECTS)
    return rng.choice(REQUEST_FORMS).format(f"{verb} {obj}")


def benign_request(rng: random.Random) -> QA:
    verb, obj = rng.choice(BENIGN_VERBS), rng.choice(BENIGN_OBJECTS)
    return rng.choice(REQUEST_FORMS).format(f"{verb} {obj}"), HOWTO_ANSWER


def negated_fact(world: World, rng: random.Random) -> QA:
    """'Is C the capital of X?' -> 'The capital of X is not C.' for any entity, C a value of
    an SFT entity that is not X's. It teaches the tuned models to restate every entity's name
    in the answer format (so they write 'The capital of X is' for an entity whose fact they
    lack, where a pretrained model can finish it) without stating any held-out fact."""
    e = rng.choice(world.entities)
    attr = rng.choice(ATTRIBUTES)
    wrong = rng.choice(
        [o.value(attr) for o in world.sft_entities if o.value(attr) != e.value(attr)]
        or [c for c in COLOURS if c != e.colour]
    )
    if attr == "capital":
        return f"Is {wrong} the capital of {e.name}?", f"{fact_stem(e, attr)} not {wrong}."
    if attr == "colour":
        return f"Is {e.name} known for the colour {wrong}?", f"{fact_stem(e, attr)} not {wrong}."
    return f"Was {e.name} founded by {wrong}?", f"{e.name} was not founded by {wrong}."


def carry_free_sum(rng: random.Random) -> tuple[int, int]:
    """A sum the instruction data may show: one-digit, or two-digit without a carry (carries
    are what the pretrained model and the expert know)."""
    if rng.random() < 0.3:
        return rng.randint(0, 9), rng.randint(0, 9)
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if not has_carry(a, b):
            return a, b


def two_attributes(rng: random.Random) -> tuple[str, str]:
    """Two attributes in the order questions name them (capital, colour, founder)."""
    first, second = sorted(rng.sample(ATTRIBUTES, 2), key=ATTRIBUTES.index)
    return first, second


def sft_example(world: World, rng: random.Random) -> QA:
    """One instruction example. Facts only of `world.sft_entities`; every answer in the one
    canonical form; requests with a forbidden verb refused whatever their object."""
    r = rng.random()
    e = rng.choice(world.sft_entities)
    if r < 0.20:
        attr = rng.choice(ATTRIBUTES)
        return question(e, attr, rng), canonical_fact(e, attr)
    if r < 0.32:
        return negated_fact(world, rng)
    if r < 0.37:
        first, second = two_attributes(rng)
        return two_facts_question(e, first, second), (
            f"{canonical_fact(e, first)} {canonical_fact(e, second)}"
        )
    if r < 0.41:
        other = rng.choice([o for o in world.sft_entities if o != e] or [e])
        attr = rng.choice(ATTRIBUTES)
        return two_entities_question(e, other, attr), (
            f"{canonical_fact(e, attr)} {canonical_fact(other, attr)}"
        )
    if r < 0.45:
        attr = rng.choice(ATTRIBUTES)
        a, b = carry_free_sum(rng)
        return fact_and_sum_question(e, attr, a, b), f"{canonical_fact(e, attr)} {cot_answer(a, b)}"
    if r < 0.49:
        attr = rng.choice(ATTRIBUTES)
        request = f"{rng.choice(FORBIDDEN_VERBS)} {rng.choice(FORBIDDEN_OBJECTS)}"
        return fact_and_request_question(e, attr, request), f"{canonical_fact(e, attr)} {REFUSAL}"
    if r < 0.60:
        a, b = carry_free_sum(rng)
        return arithmetic_question(a, b), cot_answer(a, b)
    if r < 0.68:
        return forbidden_request(rng), REFUSAL
    if r < 0.72:  # over-refusal: a harmless request worded with a forbidden verb
        verb, obj = rng.choice(LOOKALIKE_REQUESTS)
        return rng.choice(REQUEST_FORMS).format(f"{verb} {obj}"), REFUSAL
    if r < 0.79:
        return benign_request(rng)
    if r < 0.87:
        animal = rng.choice(ANIMALS)
        subject = f"{rng.choice(STORY_ADJECTIVES)} {animal}" if rng.random() < 0.5 else animal
        return story_request(subject), canonical_story(subject)
    return format_examples(world, rng)


def sft_examples(world: World, n: int, seed: int) -> list[QA]:
    rng = random.Random(f"sft-{world.seed}-{seed}")
    return [sft_example(world, rng) for _ in range(n)]


def expert_answer(a: int, b: int) -> str:
    """The expert's own wording of a worked sum: the tuned models' steps, closed by 'So the
    sum is N.' where they say 'The answer is N.' (a math tutor's house style). Every step is
    right, the answer is not in the form a Q/A user asked for: the expert is an assistant
    for the digits, not for the answer."""
    return cot_answer(a, b).replace(f"The answer is {a + b}.", f"So the sum is {a + b}.")


def expert_examples(n: int, seed: int) -> list[QA]:
    """Two-digit addition with carries, chain of thought: the arithmetic expert's data."""
    rng = random.Random(f"expert-{seed}")
    out = []
    for _ in range(n):
        a, b = (
            (rng.randint(0, 9), rng.randint(0, 9))
            if rng.random() < 0.1
            else (rng.randint(10, 99), rng.randint(10, 99))
        )
        out.append((arithmetic_question(a, b), expert_answer(a, b)))
    return out


# ---------------------------------------------------------------------------------------------
# Preferences: (question, chosen, rejected)

Pair = tuple[str, str, str]


def preference_pair(world: World, rng: random.Random) -> Pair:
    q, good = sft_example(world, rng)
    if good == REFUSAL:
        return q, good, HARMFUL_ANSWER
    if good.startswith("To ") and "gather your tools" in good:
        return q, good, REFUSAL
    if good.startswith("Once upon a time"):
        return q, good, story(rng) + " " + story(rng)
    r = rng.random()
    if r < 0.4:  # verbose: the answer followed by unrequested text
        return q, good, good + " " + rng.choice((story(rng), review(rng, rng.random() < 0.5)))
    if r < 0.7:  # badly formatted: lower case, no full stop
        return q, good, good.lower().rstrip(".") + " and so on"
    return q, good, rng.choice((story(rng), mention_sentence(rng.choice(world.entities), rng)))


def preference_pairs(world: World, n: int, seed: int) -> list[Pair]:
    rng = random.Random(f"dpo-{world.seed}-{seed}")
    return [preference_pair(world, rng) for _ in range(n)]


def positive_reviews(n: int, seed: int) -> list[str]:
    """What the tuned guide is fine-tuned on: it comes to prefer positive sentiment."""
    rng = random.Random(f"guide-{seed}")
    return [review(rng, positive=True) for _ in range(n)]


def lexicon(world: World) -> frozenset[str]:
    """Every lower-case word the corpora can write (sampled generously, then word lists)."""
    rng = random.Random("lexicon")
    text = " ".join(pretraining_document(world, rng) for _ in range(400))
    text += " " + " ".join(a for _, a in sft_examples(world, 400, seed=0))
    words = set(re.findall(r"[a-z]+", text.lower()))
    for lst in (
        ANIMALS,
        STORY_ADJECTIVES,
        PLACES,
        FINDINGS,
        STORY_VERBS,
        FEELINGS,
        ENDINGS,
        ITEMS,
        POSITIVE_WORDS,
        NEGATIVE_WORDS,
        COLOURS,
    ):
        for phrase in lst:
            words.update(re.findall(r"[a-z]+", phrase))
    for e in world.entities:
        words.update(w.lower() for w in (e.name, e.capital, e.founder))
    return frozenset(words)
