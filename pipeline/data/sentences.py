"""English sentences for the synthetic multi-voice corpus (voices.py), made from templates and word lists.

``english_sentences(count, seed)`` fills sentence templates with words drawn by a seeded generator, so the same
arguments always give the same list. The text uses letters, spaces, apostrophes and ``. , ? !`` only (no digits):
every character a speech recogniser's letter vocabulary can spell, nothing a synthesiser reads out in its own way.
"""

from __future__ import annotations

import random


def _words(text: str) -> tuple[str, ...]:
    """A word list written as ``;``-separated entries over lines."""
    return tuple(" ".join(entry.split()) for entry in text.split(";") if entry.strip())


PEOPLE = _words(
    """
    the old fisherman; my younger sister; a tired nurse; the new teacher; our neighbour; the quiet student;
    a famous painter; the baker; his grandmother; the young pilot; every farmer; the clever engineer; a stranger;
    the shy librarian; her best friend; the travelling musician; the night guard; my uncle; a curious child;
    the head chef; the postman; a retired sailor; the lighthouse keeper; the mayor; our driver; the gardener;
    a busy lawyer; the village doctor
    """
)
# past tense, base form, object
ACTIONS = tuple(
    tuple(part.strip() for part in action.split(","))
    for action in _words(
        """
        found, find, a silver key; painted, paint, the garden fence; carried, carry, a heavy basket;
        fixed, fix, the broken bicycle; cooked, cook, a pot of vegetable soup; sold, sell, fresh strawberries;
        read, read, an old newspaper; lost, lose, a brown leather wallet; built, build, a wooden bridge;
        sang, sing, a song about the sea; planted, plant, a row of apple trees; counted, count, the empty bottles;
        washed, wash, the muddy boots; borrowed, borrow, a yellow umbrella; photographed, photograph, the frozen lake;
        opened, open, a mysterious parcel; cleaned, clean, the dusty windows; delivered, deliver, a bunch of flowers;
        measured, measure, the length of the hall; repaired, repair, the kitchen clock; climbed, climb, the steep hill;
        wrote, write, a letter to the council; watched, watch, the boats come in; tasted, taste, the spicy sauce;
        hid, hide, the birthday present; chased, chase, a runaway goat; ordered, order, a cup of strong coffee;
        answered, answer, every single question
        """
    )
)
PLACES = _words(
    """
    near the harbour; behind the station; in the crowded market; at the edge of the forest; under the old bridge;
    beside the village church; on the top floor; in a narrow alley; outside the bakery; across the river;
    in the school yard; by the frozen pond; at the bus stop; inside the museum; along the sandy beach;
    next to the post office; in the back garden; on the crowded platform; at the foot of the mountain;
    in the quiet library
    """
)
TIMES = _words(
    """
    early this morning; before the storm; last winter; after midnight; on a rainy Tuesday;
    during the long summer holiday; just before sunset; yesterday afternoon; at the end of the week;
    in the middle of the night; while everyone was asleep; on the first day of spring; a long time ago;
    right after lunch; later that evening; on Friday
    """
)
ADJECTIVES = _words(
    """
    bright; gloomy; enormous; tiny; peaceful; noisy; strange; beautiful; cold; warm; dusty; shiny; ancient;
    fragile; crooked; delightful; slippery; crowded; empty; golden
    """
)
THINGS = _words(
    """
    lantern; piano; garden; kitten; painting; carpet; violin; window; teapot; bicycle; mirror; compass; blanket;
    wagon; statue; fountain; journal; sailboat; harvest; castle
    """
)
DEADLINES = _words(
    "the end of the day; the guests arrive; the shop closes; the rain starts; we leave for the airport; dinner; "
    "tomorrow morning; the holidays begin"
)
FEELINGS = _words("surprised; delighted; worried; puzzled; relieved; annoyed; proud; nervous")

TEMPLATES = (
    "{P} {past} {obj} {place} {time}.",
    "Did {p} really {base} {obj} {place}?",
    "{T}, {p} {past} {obj}, and nobody noticed.",
    "Nobody expected {p} to {base} {obj} {time}.",
    "Why would {p} want to {base} {obj} {place}?",
    "If the weather stays {adj}, {p} will {base} {obj} {place}.",
    "The {adj} {thing} {place} belongs to {p}.",
    "I think {p} wants to {base} {obj} {time}!",
    "Look at that {adj} {thing} {place}!",
    "We couldn't believe how {adj} the {thing} was {time}.",
    "Please ask {p} to {base} {obj} before {time2}.",
    "{P} was {feeling} to see such {a_adj} {thing} {place}.",
    "When {p} {past} {obj}, {p2} felt {feeling}.",
    "It's not every day that {p} {past} {obj} {place}.",
    "Could you tell {p} that the {thing} is {adj} again?",
    "After {p} had {pastp} {obj}, the {thing} looked {adj}.",
    "First {p} {past} {obj}, and then {p2} {past2} {obj2}.",
    "Is it true that the {thing} {place} is so {adj}?",
    "Honestly, I have never seen a {thing} as {adj} as the one {place}.",
)


def _fill(template: str, rng: random.Random) -> str:
    (past, base, obj), (past2, _, obj2) = rng.sample(ACTIONS, 2)
    person, other = rng.sample(PEOPLE, 2)
    time = rng.choice(TIMES)
    adjective = rng.choice(ADJECTIVES)
    words = {
        "p": person,
        "P": person[0].upper() + person[1:],
        "p2": other,
        "past": past,
        "past2": past2,
        "obj2": obj2,
        "pastp": _participle(past, base),
        "base": base,
        "obj": obj,
        "place": rng.choice(PLACES),
        "time": time,
        "T": time[0].upper() + time[1:],
        "time2": rng.choice(DEADLINES),
        "adj": adjective,
        "a_adj": ("an " if adjective[0] in "aeiou" else "a ") + adjective,
        "thing": rng.choice(THINGS),
        "feeling": rng.choice(FEELINGS),
    }
    return template.format(**words)


IRREGULAR_PARTICIPLES = {"write": "written", "sing": "sung", "hide": "hidden"}


def _participle(past: str, base: str) -> str:
    return IRREGULAR_PARTICIPLES.get(base, past)


def english_sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct sentences, the templates taken in turn and filled with words drawn from a generator
    seeded with ``seed``: the same arguments always give the same list (and a longer list starts with a shorter one)."""
    if count < 1:
        raise ValueError(f"count={count} must be at least 1")
    rng = random.Random(seed)
    sentences: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(sentences) < count:
        attempts += 1
        if attempts > 50 * count:
            raise ValueError(f"cannot make {count} distinct sentences from the templates")
        sentence = _fill(TEMPLATES[attempts % len(TEMPLATES)], rng)
        if sentence not in seen:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences
