"""Question phrasings of the schema-reading corpus: templates per query kind and condition forms.

{s} is the selected column as the question says it, {c} the conditions, {a} the aggregate's
word. Each set comes in a training part and a held-out part (never trained on, measured by the
build), and FRENCH is a whole question style the base model never sees: the fine-tuning
showcase teaches it (`loraforge demo-data --style french`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phrasing:
    """Everything a question generator needs to word a query in one style."""

    select: tuple[str, ...]
    count: tuple[str, ...]
    aggregate: tuple[str, ...]  # MAX, MIN, SUM, AVG: "{a} {s}"
    no_condition: tuple[str, ...]  # plain and aggregate questions about the whole table
    count_all: tuple[str, ...]
    agg_words: dict[str, tuple[str, ...]]
    equals: tuple[str, ...]  # "{p}" the column as said, "{x}" the value
    greater: tuple[str, ...]
    less: tuple[str, ...]
    joiners: tuple[str, ...]  # between two conditions
    # The condition's column unsaid: "{x}" the value alone (its column is the one named for
    # the value's kind); plain and COUNT questions.
    implicit: tuple[str, ...] = ()
    implicit_count: tuple[str, ...] = ()


# fmt: off
_SELECT = (
    "what is the {s} when {c}", "what was the {s} when {c}", "which {s} has {c}",
    "name the {s} when {c}", "tell me the {s} for {c}", "list the {s} with {c}",
    "who is the {s} when {c}", "what {s} has {c}", "give the {s} where {c}", "{s} when {c}",
    "what are the {s} with {c}", "which {s} had {c}", "what is the {s} for {c}",
    "what is the {s} where {c}", "who was the {s} when {c}", "when was the {s} with {c}",
    "what {s} had {c}", "tell me the {s} when {c}", "name the {s} for {c}",
    "what was the {s} for {c}", "which {s} is it when {c}", "show the {s} where {c}",
    "find the {s} with {c}", "what's the {s} when {c}", "where is the {s} with {c}",
    "what is listed as the {s} when {c}", "give me the {s} with {c}",
)
_SELECT_HELD = (
    "i want to know the {s} when {c}", "could you tell me the {s} where {c}",
    "which {s} goes with {c}", "report the {s} in the row where {c}",
)
_COUNT = (
    "how many {s} have {c}", "how many {s} when {c}", "what is the total number of {s} when {c}",
    "count the {s} where {c}", "what is the number of {s} for {c}",
    "how many {s} are there with {c}", "tell me the number of {s} with {c}",
    "name the total number of {s} for {c}", "how many {s} had {c}", "how many {s} are listed when {c}",
    "what is the count of {s} when {c}", "how many different {s} have {c}",
    "how many times is {c}", "number of {s} with {c}", "how many {s} were there when {c}",
)
_COUNT_HELD = ("give the count of {s} where {c}", "in how many rows is {c}")
_AGGREGATE = (
    "what is the {a} {s} when {c}", "which is the {a} {s} with {c}", "name the {a} {s} for {c}",
    "tell me the {a} {s} where {c}", "what was the {a} {s} when {c}", "{a} {s} with {c}",
    "what is the {a} {s} for {c}", "what's the {a} {s} where {c}", "give the {a} {s} with {c}",
    "what is the {a} {s} that has {c}", "name the {a} {s} when {c}",
)
_AGGREGATE_HELD = ("compute the {a} {s} where {c}", "i need the {a} {s} for {c}")
_NO_CONDITION = ("what is the {a} {s}", "name the {a} {s}", "tell me the {a} {s}")
_COUNT_ALL = ("how many {s} are there", "what is the total number of {s}", "count the {s}")
_AGG_WORDS = {
    "MAX": ("highest", "largest", "maximum", "most", "greatest", "biggest", "top", "latest"),
    "MIN": ("lowest", "smallest", "minimum", "fewest", "least", "earliest"),
    "SUM": ("total", "sum of", "combined", "sum of the"),
    "AVG": ("average", "mean"),
}
_EQUALS = (
    "{p} is {x}", "the {p} is {x}", "{p} of {x}", "a {p} of {x}", "{p} {x}", "the {p} {x}",
    "{p} was {x}", "the {p} was {x}", "{p} equals {x}", "{x} as the {p}", "{x} for {p}",
    "{p} is '{x}'",
)
_EQUALS_HELD = ("{p} being {x}", "{p} set to {x}")
_GREATER = (
    "{p} is greater than {x}", "{p} more than {x}", "{p} larger than {x}", "{p} over {x}",
    "the {p} is over {x}", "{p} above {x}", "{p} is bigger than {x}", "a {p} greater than {x}",
    "{p} higher than {x}", "{p} is more than {x}",
)
_GREATER_HELD = ("{p} exceeding {x}", "{p} in excess of {x}")
_LESS = (
    "{p} is less than {x}", "{p} less than {x}", "{p} smaller than {x}", "{p} under {x}",
    "the {p} is below {x}", "{p} below {x}", "{p} is lower than {x}", "a {p} less than {x}",
    "{p} fewer than {x}", "{p} is smaller than {x}",
)
_LESS_HELD = ("{p} not reaching {x}", "{p} short of {x}")
_JOINERS = (" and ", " and ", " and the ", ", and ", " and when ", " with ")
_JOINERS_HELD = (" as well as ", " plus ")
_IMPLICIT = (
    "what is the {s} of {x}", "what was the {s} for {x}", "what {s} did {x} have",
    "name the {s} for {x}", "tell me the {s} of {x}", "which {s} has {x}",
    "what is the {s} for {x}", "what {s} is {x}", "what was the {s} of {x}",
    "what {s} was {x} in", "give the {s} for {x}",
)
_IMPLICIT_COUNT = (
    "how many {s} did {x} have", "how many {s} for {x}", "what is the number of {s} for {x}",
    "how many {s} have {x}", "how many different {s} does {x} have",
)

TRAIN = Phrasing(
    _SELECT, _COUNT, _AGGREGATE, _NO_CONDITION, _COUNT_ALL, _AGG_WORDS, _EQUALS, _GREATER,
    _LESS, _JOINERS, _IMPLICIT, _IMPLICIT_COUNT,
)
# Held out: every question takes a held-out template; its conditions mostly held-out forms.
HELD_OUT = Phrasing(
    _SELECT_HELD, _COUNT_HELD, _AGGREGATE_HELD, (), (), _AGG_WORDS,
    _EQUALS_HELD + _EQUALS[:2], _GREATER_HELD + _GREATER[:1], _LESS_HELD + _LESS[:1],
    _JOINERS_HELD + _JOINERS[:1],
)
FRENCH = Phrasing(
    select=(
        "quel est le {s} quand {c}", "quelle est la {s} lorsque {c}", "donne le {s} où {c}",
        "quel {s} a {c}", "indique le {s} pour {c}", "qui est le {s} quand {c}",
        "quels sont les {s} avec {c}", "nomme le {s} quand {c}",
    ),
    count=(
        "combien de {s} ont {c}", "combien de {s} quand {c}", "quel est le nombre de {s} où {c}",
        "compte les {s} avec {c}", "combien y a-t-il de {s} lorsque {c}",
    ),
    aggregate=(
        "quel est le {s} {a} quand {c}", "donne le {s} {a} où {c}", "quel {s} {a} pour {c}",
        "indique le {s} {a} lorsque {c}",
    ),
    no_condition=("quel est le {s} {a}", "donne le {s} {a}"),
    count_all=("combien de {s} y a-t-il", "quel est le nombre total de {s}"),
    agg_words={
        "MAX": ("le plus élevé", "maximal", "le plus grand"),
        "MIN": ("le plus bas", "minimal", "le plus petit"),
        "SUM": ("total", "cumulé"),
        "AVG": ("moyen", "en moyenne"),
    },
    equals=("{p} est {x}", "le {p} est {x}", "{p} vaut {x}", "la {p} est {x}", "{p} égal à {x}"),
    greater=("{p} est supérieur à {x}", "{p} dépasse {x}", "{p} plus de {x}"),
    less=("{p} est inférieur à {x}", "{p} moins de {x}", "{p} en dessous de {x}"),
    joiners=(" et ", " et que "),
)
# fmt: on
STYLES: dict[str, Phrasing] = {"english": TRAIN, "held-out": HELD_OUT, "french": FRENCH}
