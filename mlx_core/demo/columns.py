"""Tables of the schema-reading corpus: ids, column names and values, drawn from `words.py`.

A column's name says nothing about its values (a "Rebounds" column may hold places), so the only
way to answer is to read the header and copy from the question. Every choice is drawn from the
caller's `random.Random`, so a seed gives the same tables.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from mlx_core.demo.words import (
    CONNECTORS,
    COUNTRIES,
    FIRST_NAMES,
    LAST_NAMES,
    PLACES,
    RESERVED,
    UNITS,
    names,
    pseudo_word,
    split_words,
    topic_words,
)

TEXT, NUMBER = "text", "number"
MONTHS = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december",
)  # fmt: skip


@dataclass(frozen=True)
class MadeUp:
    """How often a column word or a person's name is a made-up word instead of a listed one.

    A listed word seen in thousands of tables can be learned by heart; a made-up word is new in
    every table and can only be copied. The training part uses more of them than the measured
    parts so the model learns to copy any spelling, while the measured sets stay the same.
    """

    column_word: float = 0.12
    name_part: float = 0.25


@dataclass(frozen=True)
class Vocabulary:
    """The words one part of the corpus (training or held out) builds its tables from."""

    words: tuple[str, ...]  # topic entries, lower case, some of several words
    people: tuple[str, ...]  # first and last names, lower case
    places: tuple[str, ...]
    made_up: MadeUp

    @classmethod
    def part(cls, held_out: bool, fraction: float, made_up: MadeUp) -> Vocabulary:
        """The training part (`held_out` False) or the held-out part of every word list."""
        pick = lambda ws: tuple(split_words(ws, fraction, held_out))  # noqa: E731
        return cls(
            pick(topic_words()),
            pick(names(FIRST_NAMES + LAST_NAMES)),
            pick(names(PLACES + COUNTRIES)),
            made_up,
        )


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # TEXT or NUMBER: what its values look like, and so which questions it allows
    typed: str | None = None  # a key of TYPED: the name says what its values are


# WikiSQL's questions often leave the condition's column unsaid ("Where was Assen held?": the
# Circuit); the value's kind points to it. Columns named for a kind hold values of that kind, so
# such questions can be answered by a column whose name says people, places, dates or scores.
TYPED: dict[str, tuple[str, ...]] = {
    "person": ("player", "name", "driver", "winner", "artist", "director", "coach", "candidate",
               "incumbent", "captain", "opponent", "race winner", "pole position", "author"),
    "place": ("venue", "city", "location", "circuit", "hometown", "country", "nationality",
              "birthplace", "home ground", "destination"),
    "date": ("date", "air date", "release date", "original air date", "opened", "founded date"),
    "score": ("score", "result", "final score", "record"),
}  # fmt: skip


# -- case -------------------------------------------------------------------------------------
def title(text: str) -> str:
    """ "home team" -> "Home Team", leaving short connectors ("of") and units as they are."""
    return " ".join(
        w if w in CONNECTORS or not w[:1].isalpha() else w[:1].upper() + w[1:]
        for w in text.split(" ")
    )


def styled(text: str, rng: random.Random) -> str:
    """Title Case, Sentence case or lower case, as WikiSQL's headers mix them."""
    style = rng.random()
    if style < 0.45:
        return title(text)
    if style < 0.85:
        return text[:1].upper() + text[1:]
    return text if style < 0.97 else text.upper()


# -- table ids ----------------------------------------------------------------------------------
def table_id(rng: random.Random, v: Vocabulary) -> str:
    """An id in one of many shapes: WikiSQL's `1-10015132-16`, words, snake_case, digits."""
    shape = rng.random()
    if shape < 0.45:
        digits = rng.randint(5, 8)
        return f"{rng.choice((1, 1, 2))}-{rng.randint(10 ** (digits - 1), 10**digits - 1)}-{rng.randint(1, 99)}"
    word = re.sub(r"[^a-z0-9]+", "_", rng.choice(v.words)).strip("_") or pseudo_word(rng)
    if shape < 0.6:
        return word
    if shape < 0.72:
        return f"{word}_{rng.randint(1, 2024)}"
    if shape < 0.82:
        other = re.sub(r"[^a-z0-9]+", "_", rng.choice(v.words)).strip("_")
        return f"{word}_{other}"
    if shape < 0.9:
        return f"{rng.choice(('table', 't', 'tbl', 'data'))}{rng.choice(('_', ''))}{rng.randint(1, 999)}"
    if shape < 0.95:
        return title(word.replace("_", " ")).replace(" ", "")
    return f"{pseudo_word(rng)}-{rng.randint(1, 99)}"


# -- column names -------------------------------------------------------------------------------
def _word(rng: random.Random, v: Vocabulary) -> str:
    return pseudo_word(rng) if rng.random() < v.made_up.column_word else rng.choice(v.words)


def column_name(rng: random.Random, v: Vocabulary) -> str:
    """A header entry: one or more words, sometimes with "/", "(...)", "#", "%", "No." or digits."""
    shape = rng.random()
    base = _word(rng, v)
    if shape < 0.3:
        name = base
    elif shape < 0.5:
        name = f"{_word(rng, v)} {base}"
    elif shape < 0.58:
        name = f"{base} {rng.choice(CONNECTORS)} {_word(rng, v)}"
    elif shape < 0.66:
        name = f"{base}/{_word(rng, v)}"
    elif shape < 0.76:
        name = f"{base} ({rng.choice(UNITS)})"
    elif shape < 0.8:
        name = f"# of {base}"
    elif shape < 0.83:
        name = f"% {base}"
    elif shape < 0.87:
        name = f"No. {rng.randint(1, 20)}" if rng.random() < 0.3 else f"{base} No."
    elif shape < 0.93:
        name = (
            f"{base} {rng.randint(1, 2020)}"
            if rng.random() < 0.5
            else f"{rng.randint(1990, 2020)} {base}"
        )
    else:
        name = f"{_word(rng, v)} {_word(rng, v)} {base}"
    return styled(name, rng)


def _clean(name: str) -> bool:
    # Names that the header or the WikiSQL reader would split or misread are drawn again.
    low = name.lower()
    return (
        ", " not in name
        and "'" not in name
        and not set(low.split()) & RESERVED
        and not low.endswith(" a")
        and len(name) <= 40
    )


def table_columns(rng: random.Random, v: Vocabulary) -> list[Column]:
    """3-10 columns with distinct names (case-insensitively), about 40 % of them numeric."""
    n = rng.choices(range(3, 11), weights=(6, 10, 12, 10, 8, 6, 4, 3))[0]
    chosen: dict[str, Column] = {}
    for kind in rng.sample(list(TYPED), rng.choices((0, 1, 2), (45, 40, 15))[0]):
        name = styled(rng.choice(TYPED[kind]), rng)
        chosen[name.lower()] = Column(name, TEXT, kind)
    while len(chosen) < n:
        name = column_name(rng, v)
        if _clean(name) and name.lower() not in chosen:
            chosen[name.lower()] = Column(name, NUMBER if rng.random() < 0.4 else TEXT)
    columns = list(chosen.values())
    rng.shuffle(columns)
    return columns


# -- values -------------------------------------------------------------------------------------
def _cap(word: str) -> str:
    return " ".join(p[:1].upper() + p[1:] for p in word.split(" "))


def person(rng: random.Random, v: Vocabulary) -> str:
    share = v.made_up.name_part
    first = pseudo_word(rng) if rng.random() < share else rng.choice(v.people)
    last = pseudo_word(rng) if rng.random() < share else rng.choice(v.people)
    name = f"{_cap(first)} {_cap(last)}"
    if rng.random() < 0.1:
        name = f"{_cap(first)[0]}. {_cap(last)}"
    return name


def date(rng: random.Random) -> str:
    year, month, day = rng.randint(1900, 2024), rng.choice(MONTHS), rng.randint(1, 28)
    shape = rng.random()
    if shape < 0.4:
        return f"{_cap(month)} {day}, {year}"
    if shape < 0.6:
        return f"{day} {_cap(month)} {year}"
    if shape < 0.75:
        return f"{year}-{rng.randint(1, 12):02d}-{day:02d}"
    if shape < 0.9:
        return f"{_cap(month)} {year}"
    return f"{month} {day}, {year}"  # WikiSQL's lower-cased questions


def text_value(rng: random.Random, v: Vocabulary, typed: str | None = None) -> str:
    """A text value of some kind: a person, place, date, score, code, phrase or made-up name;
    of the `typed` kind (a key of TYPED) when given."""
    typed_kinds = {"person": 0, "place": 1, "date": 2, "score": 3}
    kind = rng.choices(range(10), weights=(18, 14, 10, 8, 8, 10, 10, 8, 8, 6))[0]
    if typed is not None:
        kind = typed_kinds[typed]
    if kind == 0:
        return person(rng, v)
    if kind == 1:
        return _cap(rng.choice(v.places))
    if kind == 2:
        return date(rng)
    if kind == 3:  # a score: "10-4", "W 24-17", "3–1 (aet)"
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        score = f"{a}-{b}"
        return rng.choice((score, score, f"W {score}", f"L {score}", f"{score} (OT)"))
    if kind == 4:  # codes: "A-12", "XJ220", "#4", "KX-7b"
        letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTVWXYZ") for _ in range(rng.randint(1, 3)))
        return rng.choice(
            (
                f"{letters}-{rng.randint(1, 999)}",
                f"{letters}{rng.randint(1, 999)}",
                f"#{rng.randint(1, 99)}",
            )
        )
    if kind == 5:
        return _cap(f"{rng.choice(v.words)} {rng.choice(v.words)}")
    if kind == 6:
        return _cap(pseudo_word(rng)) + ("" if rng.random() < 0.6 else f" {_cap(pseudo_word(rng))}")
    if kind == 7:  # mixed case and odd spelling: "McKinley", "iPhone", "DJ Krall", "FC Porto"
        w = pseudo_word(rng)
        return rng.choice(
            (f"Mc{_cap(w)}", f"i{_cap(w)}", f"{w.upper()}", f"FC {_cap(w)}", f"{_cap(w)} Jr.")
        )
    if kind == 8:
        return rng.choice(v.words)  # lower case, as WikiSQL's own values often are
    return f"{_cap(rng.choice(v.words))} {rng.randint(1, 99)}"


def number(rng: random.Random) -> float:
    """An integer (mostly) or a one- or two-decimal number, of varied size."""
    magnitude = rng.choice((10, 100, 1000, 100_000, 10_000_000))
    value = rng.randint(0, magnitude)
    if rng.random() < 0.25:
        return round(value / rng.choice((10, 100)) + rng.random(), rng.choice((1, 2)))
    return float(value)


def show(value: str | float) -> str:
    """A value as both the question and the SQL write it."""
    if isinstance(value, str):
        return value
    return str(int(value)) if value.is_integer() else repr(value)
