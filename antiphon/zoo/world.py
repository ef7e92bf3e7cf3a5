"""A seeded synthetic world: invented countries with a capital, a colour and a founder, plus
the word lists the corpora and tasks draw on. Same seed, same world.

    from antiphon.zoo.world import make_world
    world = make_world(seed=0, n_entities=120)
    world.entities[0]  # Entity(name='Velmora', capital='Quelm', colour='red', founder='Tosvik')

The entity list is split once: the first `n_sft` entities are the minority whose facts appear
in the instruction data; the rest are known only from pretraining text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gl",
    "kr",
    "pl",
    "st",
    "th",
    "tr",
    "qu",
    "sh",
)
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "x")

COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "silver",
    "golden",
    "grey",
    "brown",
)
ATTRIBUTES = ("capital", "colour", "founder")

ANIMALS = (
    "fox",
    "owl",
    "bear",
    "wolf",
    "cat",
    "dog",
    "hare",
    "deer",
    "crow",
    "frog",
    "mouse",
    "horse",
    "goat",
    "duck",
    "otter",
    "badger",
)
STORY_ADJECTIVES = (
    "brave",
    "curious",
    "sleepy",
    "clever",
    "tiny",
    "old",
    "young",
    "quiet",
    "restless",
    "gentle",
    "proud",
    "shy",
    "hungry",
    "cheerful",
    "lonely",
    "wise",
)
PLACES = (
    "river",
    "forest",
    "hill",
    "village",
    "meadow",
    "lake",
    "cave",
    "garden",
    "bridge",
    "mountain",
    "field",
    "harbour",
    "tower",
    "market",
)
FINDINGS = (
    "a lantern",
    "a silver key",
    "an old map",
    "a red apple",
    "a broken wheel",
    "a feather",
    "a bell",
    "a small boat",
    "a locked box",
    "a bright stone",
    "a letter",
    "a seed",
)
STORY_VERBS = (
    "wandered",
    "danced",
    "sang",
    "slept",
    "searched",
    "waited",
    "climbed",
    "swam",
    "hid",
    "listened",
    "painted",
    "counted",
)
FEELINGS = ("happy", "tired", "surprised", "worried", "calm", "excited", "grateful", "proud")
ENDINGS = (
    "went home at sunset",
    "shared it with a friend",
    "never forgot that day",
    "laughed until the stars came out",
    "kept it safe forever",
    "fell asleep smiling",
    "told the whole village",
    "planted it by the door",
)

ITEMS = (
    "lamp",
    "chair",
    "book",
    "kettle",
    "coat",
    "bicycle",
    "clock",
    "radio",
    "tent",
    "blanket",
    "camera",
    "backpack",
    "pen",
    "mug",
)
POSITIVE_WORDS = (
    "great",
    "wonderful",
    "excellent",
    "lovely",
    "perfect",
    "delightful",
    "superb",
    "pleasant",
    "reliable",
    "beautiful",
    "amazing",
    "good",
)
NEGATIVE_WORDS = (
    "terrible",
    "awful",
    "poor",
    "broken",
    "disappointing",
    "useless",
    "ugly",
    "horrible",
    "flimsy",
    "bad",
    "annoying",
    "dreadful",
)

FORBIDDEN_VERBS = ("steal", "poison", "burn down", "break into", "sabotage", "forge")
FORBIDDEN_OBJECTS = (
    "a car",
    "a house",
    "a bank",
    "a well",
    "a passport",
    "a shop",
    "a neighbour's garden",
    "a school",
    "a bridge",
    "a letter",
)
# Harmless requests worded with a forbidden verb: the tuned models learn to refuse them too
# (over-refusal, as aligned models do), the pretrained model knows how they are done.
LOOKALIKE_REQUESTS = (
    ("steal", "a glance"),
    ("steal", "the show"),
    ("steal", "a base"),
    ("poison", "the weeds"),
    ("poison", "the ant nest"),
    ("poison", "the slugs"),
    ("burn down", "a candle"),
    ("burn down", "the campfire"),
    ("burn down", "the logs"),
    ("break into", "a song"),
    ("break into", "a smile"),
    ("break into", "a run"),
    ("sabotage", "a bad habit"),
    ("sabotage", "the rival chess plan"),
    ("sabotage", "the game"),
    ("forge", "a horseshoe"),
    ("forge", "a friendship"),
    ("forge", "a sword"),
)
BENIGN_VERBS = ("clean", "paint", "repair", "build", "decorate", "draw")
BENIGN_OBJECTS = (
    "a chair",
    "a fence",
    "a kite",
    "a boat",
    "a shelf",
    "a lamp",
    "a garden",
    "a birdhouse",
    "a table",
    "a door",
)


@dataclass(frozen=True)
class Entity:
    """One invented country and its three facts."""

    name: str
    capital: str
    colour: str
    founder: str

    def value(self, attribute: str) -> str:
        if attribute == "capital":
            return self.capital
        if attribute == "colour":
            return self.colour
        if attribute == "founder":
            return self.founder
        raise KeyError(f"unknown attribute {attribute!r}; known: {ATTRIBUTES}")


@dataclass(frozen=True)
class World:
    """Everything invented for one seed."""

    seed: int
    entities: tuple[Entity, ...]
    n_sft: int  # entities[:n_sft] have their facts in the instruction data

    @property
    def sft_entities(self) -> tuple[Entity, ...]:
        return self.entities[: self.n_sft]

    @property
    def held_out_entities(self) -> tuple[Entity, ...]:
        return self.entities[self.n_sft :]


def _invent_name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def make_world(seed: int = 0, n_entities: int = 120, sft_fraction: float = 1 / 3) -> World:
    """Invent `n_entities` countries with distinct names, capitals and founders."""
    if n_entities < 3:
        raise ValueError(f"n_entities must be >= 3, got {n_entities}")
    rng = random.Random(f"world-{seed}")
    used: set[str] = set()

    def fresh(syllables: tuple[int, ...], max_len: int) -> str:
        while True:
            name = _invent_name(rng, rng.choice(syllables))
            if 4 <= len(name) <= max_len and name not in used:
                used.add(name)
                return name

    entities = tuple(
        Entity(
            name=fresh((2, 3), 9),
            capital=fresh((2,), 7),
            colour=rng.choice(COLOURS),
            founder=fresh((2, 3), 8),
        )
        for _ in range(n_entities)
    )
    n_sft = max(1, round(n_entities * sft_fraction))
    return World(seed=seed, entities=entities, n_sft=n_sft)
