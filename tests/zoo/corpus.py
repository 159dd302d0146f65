"""Text for the zoo's generated data: document words for the OCR models, English sentences for MiniLM.

Everything is drawn from a numpy Generator, so a seed fixes every string.
"""

from __future__ import annotations

import string

import numpy as np

_DOC_WORDS = (
    "invoice",
    "total",
    "amount",
    "due",
    "date",
    "customer",
    "account",
    "number",
    "order",
    "shipping",
    "address",
    "payment",
    "received",
    "balance",
    "tax",
    "subtotal",
    "quantity",
    "price",
    "unit",
    "description",
    "item",
    "report",
    "summary",
    "meeting",
    "agenda",
    "minutes",
    "project",
    "status",
    "budget",
    "revenue",
    "quarter",
    "annual",
    "review",
    "policy",
    "contract",
    "terms",
    "conditions",
    "section",
    "page",
    "chapter",
    "table",
    "figure",
    "results",
    "method",
    "analysis",
    "data",
    "sample",
    "the",
    "of",
    "and",
    "to",
    "in",
    "for",
    "with",
    "on",
    "by",
    "from",
    "at",
    "this",
    "that",
    "is",
    "are",
    "was",
    "were",
    "will",
    "be",
    "has",
    "have",
    "not",
    "all",
    "new",
    "service",
    "delivery",
    "product",
    "office",
    "street",
    "road",
    "city",
    "station",
    "hospital",
    "school",
    "library",
    "museum",
    "Monday",
    "Tuesday",
    "Friday",
    "January",
    "March",
    "June",
    "October",
    "December",
    "North",
    "South",
    "Room",
    "Floor",
    "Tel",
    "Fax",
)

_SUBJECTS = (
    "The engineer",
    "A young girl",
    "My neighbour",
    "The committee",
    "An old fisherman",
    "The teacher",
    "A small dog",
    "The company",
    "Our team",
    "The pilot",
    "A tourist",
    "The doctor",
    "The children",
    "The city council",
    "A musician",
    "The farmer",
    "The new manager",
    "A student",
    "The chef",
    "Grandma",
)
_VERBS = (
    "is repairing",
    "painted",
    "will visit",
    "has cancelled",
    "is reading",
    "bought",
    "found",
    "is cooking",
    "announced",
    "forgot",
    "is cleaning",
    "sold",
    "photographed",
    "is building",
    "described",
    "ordered",
    "lost",
    "is watching",
    "recommended",
    "delivered",
)
_OBJECTS = (
    "the broken bicycle",
    "a letter to the editor",
    "the annual budget",
    "a loaf of fresh bread",
    "the old lighthouse",
    "a new laptop",
    "the red umbrella",
    "the train schedule",
    "a bowl of soup",
    "the garden fence",
    "a paper on climate change",
    "the football match",
    "a cup of green tea",
    "the museum's new exhibit",
    "an apartment downtown",
    "the concert tickets",
    "a wooden chair",
    "the quarterly report",
    "a pair of running shoes",
    "the bridge across the river",
)
_TAILS = (
    "",
    " yesterday",
    " this morning",
    " after the storm",
    " before the deadline",
    " in the rain",
    " with great care",
    " for the third time",
    " near the station",
    " during the holidays",
    " without telling anyone",
    " last weekend",
    " at midnight",
    " on a sunny afternoon",
)
_QUESTIONS = (
    "How do I reset my password?",
    "Where is the nearest pharmacy?",
    "What time does the store open?",
    "Can you recommend a good book about history?",
    "Why is the sky blue?",
    "How long does it take to boil an egg?",
    "Is it going to rain tomorrow?",
    "Which train goes to the airport?",
    "What is the capital of Australia?",
    "How many calories are in an apple?",
    "Who wrote the novel Pride and Prejudice?",
    "When was the first computer invented?",
    "Do you deliver on Sundays?",
    "What is the difference between a virus and a bacterium?",
    "How can I improve my sleep?",
)
_STATEMENTS = (
    "Stock markets fell sharply after the interest rate announcement.",
    "The new phone has an excellent camera but the battery drains quickly.",
    "Heavy snowfall closed several mountain roads overnight.",
    "This restaurant serves the best pizza I have ever eaten.",
    "The software update fixed the login bug but introduced a new crash.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Please submit your expense reports by Friday afternoon.",
    "The hotel room was clean, quiet and surprisingly cheap.",
    "Regular exercise lowers the risk of heart disease.",
    "The package arrived damaged and two items were missing.",
    "Our flight was delayed by four hours because of fog.",
    "The museum is free for children under twelve.",
    "Add the flour slowly and stir until the dough is smooth.",
    "The team won the championship after a dramatic penalty shootout.",
    "Turn left at the second traffic light and the bank is on your right.",
    "Electric cars are becoming cheaper every year.",
    "The meeting has been moved to Thursday at ten o'clock.",
    "I really did not enjoy the ending of that movie.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library will be closed for renovation until March.",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sentence(rng: np.random.Generator) -> str:
    """One English sentence: a templated event, a question or a hand-written statement."""
    kind = rng.random()
    if kind < 0.6:
        return f"{_pick(rng, _SUBJECTS)} {_pick(rng, _VERBS)} {_pick(rng, _OBJECTS)}{_pick(rng, _TAILS)}."
    if kind < 0.8:
        return _pick(rng, _QUESTIONS)
    return _pick(rng, _STATEMENTS)


def sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct sentences (the fixed questions and statements run out first, templates fill the rest)."""
    chosen: dict[str, None] = {}  # insertion-ordered set
    for _ in range(50 * n):
        chosen.setdefault(sentence(rng))
        if len(chosen) == n:
            return list(chosen)
    raise ValueError(f"could not draw {n} distinct sentences")


def _number(rng: np.random.Generator) -> str:
    form = int(rng.integers(4))
    if form == 0:
        return f"{rng.integers(1, 10_000)}"
    if form == 1:
        return f"{rng.integers(1, 999)}.{rng.integers(0, 100):02d}"
    if form == 2:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2030)}"
    return f"No.{rng.integers(100, 99999)}"


def doc_line(rng: np.random.Generator, max_chars: int) -> str:
    """A line of document text (words, amounts, dates) of at most max_chars characters."""
    words: list[str] = []
    while True:
        word = _number(rng) if rng.random() < 0.2 else _pick(rng, _DOC_WORDS)
        if rng.random() < 0.15:
            word = word.capitalize()
        if len(" ".join([*words, word])) > max_chars:
            return " ".join(words) if words else word[:max_chars]
        words.append(word)


_CAPTCHA_CHARS = string.ascii_lowercase + string.digits


def captcha_text(rng: np.random.Generator) -> str:
    """4 to 6 lower-case letters and digits, as common text captchas use."""
    length = int(rng.integers(4, 7))
    return "".join(_CAPTCHA_CHARS[i] for i in rng.integers(len(_CAPTCHA_CHARS), size=length))
