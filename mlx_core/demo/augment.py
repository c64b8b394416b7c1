"""Training-time augmentation: swap condition values for made-up ones, in question and SQL alike.

The corpus draws text values from short word lists, so a small model learns to *guess* them
("Storm of Porto") instead of copying them from the question ("Storm of Nantes"). Replacing some
values with pseudo-words that no list contains leaves copying as the only way to lower the loss;
the copy skill then carries over to the corpus's own values and to names the model never saw.
Only training examples are changed; evaluation uses the corpus as it is.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from mlx_core.eval.wikisql import Condition, Query, parse_example, parse_query, to_wikisql

_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "cl",
    "dr",
    "gr",
    "kr",
    "pl",
    "sh",
    "st",
    "tr",
    "th",
    "",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "y")
_CODAS = ("", "", "", "", "n", "r", "s", "l", "t", "k", "m", "nd", "rt", "st", "x")
_KEYWORDS = {"and", "select", "from", "where", "count", "max", "min", "sum", "avg"}


def pseudo_word(rng: random.Random) -> str:
    """A pronounceable made-up word such as "Kelmora"; mostly capitalized, like names."""
    while True:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 2, 2, 3)))
        )
        if len(word) >= 2 and word not in _KEYWORDS:
            break
    style = rng.random()
    if style < 0.8:
        return word.capitalize()
    return word.upper() if style < 0.85 else word


def pseudo_value(rng: random.Random) -> str:
    """A made-up text value: one to three pseudo-words, sometimes with a number."""
    words = [pseudo_word(rng) for _ in range(rng.choices((1, 2, 3), (40, 45, 15))[0])]
    if rng.random() < 0.1:
        words.append(str(rng.randint(1, 999)))
    return " ".join(words)


def fresh_values(text: str, rng: random.Random, rate: float) -> str:
    """`text` with each text-valued condition, with probability `rate`, given a made-up value.

    A value is replaced only where it occurs exactly once in the question as a whole word
    sequence; otherwise (ambiguous, or inside another value) the example is returned unchanged.
    """
    example = parse_example(text)
    if example.answer is None:
        return text
    query = parse_query(example.answer, example.columns, example.table)
    mapping: dict[str, str] = {}
    for cond in query.conditions:
        if isinstance(cond.value, str) and cond.value not in mapping and rng.random() < rate:
            mapping[cond.value] = pseudo_value(rng)
    if not mapping:
        return text
    question = example.question
    for old, new in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
        pattern = re.compile(rf"(?<!\w){re.escape(old)}(?!\w)")
        if len(pattern.findall(question)) != 1:
            return text
        question = pattern.sub(new.replace("\\", "\\\\"), question)  # no group refs in new
    conditions = tuple(
        Condition(
            c.column, c.op, mapping.get(c.value, c.value) if isinstance(c.value, str) else c.value
        )
        for c in query.conditions
    )
    if any(isinstance(c.value, str) and c.value not in question for c in conditions):
        return text  # a replacement ran over another condition's value
    header = text[: text.index("\nQ:")]
    sql = to_wikisql(Query(query.table, query.select, query.agg, conditions))
    return f"{header}\nQ: {question}\nA: {sql}"


def augment(texts: Sequence[str], seed: int, rate: float) -> list[str]:
    """`fresh_values` over a list of examples, deterministic for the seed."""
    rng = random.Random(f"fresh-values:{seed}")
    return [fresh_values(t, rng, rate) for t in texts]
