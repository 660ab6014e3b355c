"""A built-in set of short, varied instructions written for potstill (no outside data), for
response and on-policy distillation demos and tests: explanations, lists, small writing tasks,
advice, definitions, comparisons, arithmetic, rewriting, sentiment, fortunes. A fixed tenth of
them is held out for evaluation."""

from __future__ import annotations

import hashlib
from typing import Literal

from .rows import Rows

_CONCEPTS = (
    "photosynthesis", "gravity", "inflation", "a rainbow", "the water cycle", "an eclipse",
    "vaccination", "compound interest", "a black hole", "evolution", "democracy", "recycling",
    "a volcano", "the internet", "an allergy", "the seasons", "a tide", "electricity",
    "a computer virus", "sleep", "friction", "a budget", "the moon's phases", "erosion",
    "a metaphor", "a password manager", "jet lag", "an echo", "a fever", "supply and demand",
)  # fmt: skip
_THINGS = (
    "fruits that are red", "animals that live in the sea", "musical instruments", "board games",
    "things to pack for a beach trip", "ways to save water", "herbs used in cooking",
    "countries in South America", "planets in the solar system", "reasons to learn a language",
    "things found in a kitchen", "outdoor sports", "birds that cannot fly", "types of clouds",
    "ways to stay warm in winter", "famous bridges", "things that are round", "colours of leaves",
    "jobs in a hospital", "ways to be a good friend", "tools in a toolbox", "breakfast foods",
    "rivers in Europe", "things that make noise", "hobbies you can do at home",
    "ways to reduce stress", "insects", "shapes", "things to do on a rainy day", "vegetables",
)  # fmt: skip
_FORMS = ("haiku", "two-line poem", "story opening", "thank-you note", "slogan", "limerick")
_TOPICS = (
    "the ocean", "a lost umbrella", "autumn", "a robot learning to cook", "a quiet library",
    "the first day of school", "a cat on a windowsill", "a train at night", "coffee",
    "a mountain sunrise", "an old map", "a garden after rain",
)  # fmt: skip
_ACTIVITIES = (
    "learning to cook", "running a first marathon", "keeping houseplants alive",
    "studying for an exam", "public speaking", "saving money", "writing clean code",
    "sleeping better", "learning to draw", "moving to a new city", "travelling light",
    "starting a vegetable garden", "making new friends", "taking better photos",
    "remembering names", "working from home", "reading more books", "learning to swim",
    "cooking rice", "staying focused",
)  # fmt: skip
_WORDS = (
    "ephemeral", "serendipity", "ubiquitous", "candid", "meticulous", "resilient", "verbose",
    "frugal", "benevolent", "ambiguous", "nostalgia", "pragmatic", "whimsical", "tenacious",
    "lucid", "obsolete", "gregarious", "mundane", "eloquent", "diligent",
)  # fmt: skip
_PAIRS = (
    ("weather", "climate"), ("a virus", "a bacterium"), ("speed", "velocity"),
    ("a lake", "a sea"), ("a crocodile", "an alligator"), ("baking", "roasting"),
    ("a star", "a planet"), ("a poem", "a song"), ("rent", "a mortgage"), ("hail", "snow"),
    ("a town", "a city"), ("jam", "jelly"), ("a debit card", "a credit card"),
    ("an ocean", "a sea"), ("a fruit", "a vegetable"),
)  # fmt: skip
_SENTENCES = (
    "Give me the report now.", "Your idea is wrong.", "Move your car.", "I need this fixed today.",
    "Stop talking during the meeting.", "Send me the file.", "You forgot to call me back.",
    "This soup is cold.", "Answer my email.", "Clean up your desk.",
)  # fmt: skip
_REVIEWS = (
    "The food was delicious and the staff were friendly.", "I waited an hour and left hungry.",
    "Great battery life, but the screen scratches easily.", "Best concert I have ever been to!",
    "The hotel room smelled of smoke.", "It does exactly what it promises.",
    "The book started slowly but the ending was wonderful.", "Never buying this brand again.",
    "Comfortable shoes, I wear them every day.", "The film was far too long and dull.",
)  # fmt: skip
_NAMES_FOR = (
    "a bakery", "a pet goldfish", "a hiking club", "a coffee shop", "a robot vacuum",
    "a podcast about space", "a sailing boat", "a bookshop", "a board game about trains",
    "a lemonade stand",
)  # fmt: skip
_WHY = (
    "do leaves change colour in autumn", "do we yawn", "does the sky look blue",
    "do cats purr", "does bread rise", "does ice float on water", "do onions make us cry",
    "do birds migrate", "do we get hiccups", "does metal feel cold", "do stars twinkle",
    "do people snore", "does the sea taste salty", "do bubbles look round",
    "do our ears pop on planes",
)  # fmt: skip
_HOW = (
    "boil an egg", "tie a tie", "write a good email subject line", "plant a tree",
    "make a cup of tea", "change a bicycle tyre", "fold a paper aeroplane", "set a table",
    "apologise to a friend", "pack a suitcase", "clean a window", "make a budget",
    "learn a new word each day", "wash wool", "start a conversation",
)  # fmt: skip
_PHRASES = (
    "Good morning", "Thank you very much", "Where is the station?", "I like apples",
    "See you tomorrow", "How much does it cost?", "The cat is sleeping", "I am hungry",
    "It is raining", "Happy birthday",
)  # fmt: skip
_EXAMPLES_OF = (
    "a renewable energy source", "a mammal that lays eggs", "a palindrome", "a prime number",
    "a musical genre", "a chemical element", "a team sport", "a programming language",
    "an antonym of 'happy'", "a citrus fruit", "a famous painting", "a desert",
    "a unit of length", "a noun", "a verb",
)  # fmt: skip
_FORTUNES = (
    "computers", "love", "science", "food", "work", "travel", "friendship", "money",
    "music", "the weather",
)  # fmt: skip


def _all() -> list[str]:
    out = [f"Explain {c} in one or two sentences." for c in _CONCEPTS]
    out += [f"List three {t}." for t in _THINGS]
    out += [f"Write a {f} about {t}." for f in _FORMS for t in _TOPICS]
    out += [f"Give one tip for {a}." for a in _ACTIVITIES]
    out += [f"What does the word '{w}' mean?" for w in _WORDS]
    out += [f"What is the difference between {a} and {b}?" for a, b in _PAIRS]
    out += [f"What is {a} plus {b}?" for a, b in ((12, 7), (25, 17), (3, 9), (40, 2), (8, 8))]
    out += [f"What is {a} times {b}?" for a, b in ((6, 7), (9, 3), (12, 4), (5, 5), (11, 3))]
    out += [f"Rewrite this more politely: '{s}'" for s in _SENTENCES]
    out += [f"Is this review positive or negative? '{r}'" for r in _REVIEWS]
    out += [f"Tell me a fortune about {c}." for c in _FORTUNES]
    out += [f"Suggest a name for {t}." for t in _NAMES_FOR]
    out += [f"Why {w}?" for w in _WHY]
    out += [f"How do you {h}?" for h in _HOW]
    out += [f"Translate into French: '{p}'" for p in _PHRASES]
    out += [f"Give an example of {e}." for e in _EXAMPLES_OF]
    return out


def _held_out(text: str) -> bool:
    # a fixed tenth, by a hash of the text: adding instructions never moves the others
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10 == 0


def instructions(split: Literal["train", "val", "all"] = "train") -> list[str]:
    """The built-in instructions (sorted as written): ``train`` (about nine tenths), ``val`` (the
    held-out tenth, fixed by a hash of each text) or ``all``."""
    items = _all()
    if split == "all":
        return items
    if split not in ("train", "val"):
        raise ValueError(f"split must be train, val or all, got {split!r}")
    return [t for t in items if _held_out(t) == (split == "val")]


def instruction_rows() -> dict[str, Rows]:
    """The built-in instructions as a data source: ``train`` and ``val`` rows with the column
    ``prompt``."""
    return {
        split: Rows({"prompt": instructions(split)}, "instructions") for split in ("train", "val")
    }


__all__ = ["instruction_rows", "instructions"]
