"""Synthetic text-to-SQL corpus for the embedded demo model.

Examples use the WikiSQL seed format (``table:/columns:/Q:/A:``) and WikiSQL notation, built as
`mlx_core.eval.wikisql.Query` objects and rendered by `to_wikisql`, so the evaluator reads back every
answer. Each condition's value is written in the question exactly as in the SQL, so a small
model can learn to copy it. Everything is deterministic from the seed; tables never repeat, and
`write_dataset` keeps each table in one split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlx_core.demo.domains import (
    DATE,
    DOMAINS_DATA,
    NUMERIC_KINDS,
    YEAR,
    ColumnSpec,
    Domain,
)
from mlx_core.demo.schema_corpus import to_chat
from mlx_core.eval.wikisql import Condition, Query, to_wikisql

DOMAINS: tuple[str, ...] = tuple(d.name for d in DOMAINS_DATA)

# --- question templates -------------------------------------------------------------------------
# {s} the selected column, {e}/{es} the row noun, {w} conditions as a clause ("the year is 1999"),
# {h} as a "with" phrase ("a year of 1999"), {v} as a verb phrase ("was released in 1999"),
# {k} the key value of a possessive question, {a} the aggregate word ("highest").

SELECT = (
    "What is the {s} when {w}?", "What was the {s} when {w}?", "Name the {s} when {w}",
    "Tell me the {s} where {w}", "What {s} has {h}?", "Which {s} has {h}?",
    "What is the {s} for {h}?", "List the {s} with {h}.", "Give the {s} of the {e} with {h}.",
    "What is the {s} of the {e} that {v}?",
)  # fmt: skip
SELECT_KEY = (
    "Which {e} has {h}?", "Which {e} {v}?", "Name the {e} that {v}", "What {e} has {h}?",
    "Tell me the {e} where {w}", "Which {e} had {h}?", "Name the {e} with {h}",
    "What is the {e} when {w}?",
)  # fmt: skip
SELECT_WHO = ("Who {v}?", "Who is the {e} with {h}?", "Who had {h}?")
POSSESSIVE = (
    "What is {k} {s}?", "What {s} does {k0} have?", "Tell me the {s} of {k0}",
    "What is the {s} for {k0}?", "Name the {s} of {k0}", "What was {k} {s}?",
    "Give me {k} {s}.", "What {s} is listed for {k0}?",
)  # fmt: skip
COUNT = (
    "What is the total number of {s} when {w}?", "What is the number of {s} when {w}?",
    "How many {s} entries have {h}?", "Count the {s} where {w}.", "How many times is {w}?",
    "How many {s} are listed when {w}?", "Number of {s} with {h}?",
    "Tell me the number of {s} for {h}",
)  # fmt: skip
COUNT_KEY = (
    "How many {es} have {h}?", "How many {es} {vp}?", "How many {es} are there with {h}?",
    "Count the {es} where {w}.", "How many {es} had {h}?", "What is the number of {es} with {h}?",
    "How many different {es} have {h}?", "Tell me how many {es} {vp}",
)  # fmt: skip
AGGREGATE = (
    "What is the {a} {s} when {w}?", "What was the {a} {s} with {h}?", "Name the {a} {s} for {h}",
    "Tell me the {a} {s} where {w}", "What is the {a} {s} for {es} that {vp}?",
    "Which is the {a} {s} when {w}?", "Give me the {a} {s} of {es} with {h}.",
    "What's the {a} {s} where {w}?", "{a} {s} when {w}?",
)  # fmt: skip
NO_CONDITION = {
    None: ("List all the {s}.", "What are all the {s} values?", "Name every {s}."),
    "COUNT": ("How many {es} are there?", "How many {s} entries are listed?",
              "What is the total number of {es}?"),
    "AGG": ("What is the {a} {s}?", "Tell me the {a} {s}", "Name the {a} {s} of all {es}."),
}  # fmt: skip
AGG_WORDS = {
    "MAX": ("highest", "largest", "maximum", "biggest", "greatest", "top"),
    "MIN": ("lowest", "smallest", "minimum", "least"),
    "SUM": ("total", "combined", "sum of"),
    "AVG": ("average", "mean"),
}
YEAR_AGG_WORDS = {"MAX": ("latest", "most recent"), "MIN": ("earliest", "first")}
COUNTED_AGG_WORDS = {"MAX": ("most",), "MIN": ("fewest",)}  # "the most goals"

# Condition phrasings per style and operator; {p} the column phrase, {x} the value.
CLAUSE = {
    "=": ("{p} is {x}", "the {p} is {x}", "{p} is {x}", "{p} equals {x}"),
    ">": ("{p} is greater than {x}", "{p} is more than {x}", "{p} is over {x}",
          "the {p} is larger than {x}", "{p} is above {x}"),
    "<": ("{p} is less than {x}", "{p} is under {x}", "the {p} is smaller than {x}",
          "{p} is below {x}"),
}  # fmt: skip
WITH = {
    "=": ("{p} {x}", "a {p} of {x}", "{p} of {x}", "the {p} {x}"),
    ">": ("{p} over {x}", "a {p} greater than {x}", "{p} above {x}"),
    "<": ("{p} under {x}", "a {p} less than {x}", "{p} below {x}"),
}
VERB = {
    "=": ("has {p} {x}", "had a {p} of {x}", "has the {p} {x}"),
    ">": ("had a {p} over {x}", "has a {p} above {x}"),
    "<": ("had a {p} under {x}", "has a {p} below {x}"),
}
COUNTED = {">": ("more than {x} {p}",), "<": ("fewer than {x} {p}",)}  # counts: "goals"
TIMED = {
    "=": ("was {verb} in {x}",),
    ">": ("was {verb} after {x}",),
    "<": ("was {verb} before {x}",),
}
YEAR_CLAUSE = {">": ("{p} is after {x}", "{p} is later than {x}"), "<": ("{p} is before {x}",)}
PLURAL_VERBS = {"has": "have", "was": "were", "is": "are"}


@dataclass(frozen=True)
class Table:
    id: str
    domain: Domain
    columns: tuple[ColumnSpec, ...]
    rows: tuple[tuple[str | float, ...], ...]

    def header(self) -> str:
        return f"table: {self.id}\ncolumns: {', '.join(c.name for c in self.columns)}"


def show(value: str | float) -> str:
    """A value as the question and the SQL both write it."""
    if isinstance(value, str):
        return value
    return str(int(value)) if value.is_integer() else repr(value)


def _plural(verb_phrase: str) -> str:
    first, _, rest = verb_phrase.partition(" ")
    return f"{PLURAL_VERBS.get(first, first)} {rest}"


def _choose_domains(
    domains: Sequence[str] | None, exclude_domains: Sequence[str] = ()
) -> list[Domain]:
    for name in [*(domains or ()), *exclude_domains]:
        if name not in DOMAINS:
            raise ValueError(f"unknown domain {name!r}; choose from: {', '.join(DOMAINS)}")
    chosen = [
        d
        for d in DOMAINS_DATA
        if (domains is None or d.name in domains) and d.name not in exclude_domains
    ]
    if not chosen:
        raise ValueError("no domains left after domains/exclude_domains; keep at least one")
    return chosen


def _tables(rng: random.Random, domains: Sequence[Domain]) -> Iterator[Table]:
    seen: set[str] = set()
    while True:
        digits = rng.randint(5, 8)
        table_id = f"1-{rng.randint(10 ** (digits - 1), 10**digits - 1)}-{rng.randint(1, 99)}"
        if table_id in seen:
            continue
        seen.add(table_id)
        domain = rng.choice(domains)
        others = [c for c in domain.columns if c.name != domain.key]
        keep = set(rng.sample(others, rng.randint(min(3, len(others)), len(others))))
        columns = tuple(c for c in domain.columns if c.name == domain.key or c in keep)
        rows = tuple(tuple(c.value(rng) for c in columns) for _ in range(8))
        yield Table(table_id, domain, columns, rows)


def _threshold(column: ColumnSpec, value: float, op: str, rng: random.Random) -> float:
    """A round number the row's value is above (op ">") or below (op "<")."""
    if column.kind == YEAR:
        step = rng.randint(1, 5)
    else:
        step = max(1, round(abs(value) * rng.uniform(0.05, 0.3)))
    bound = max(0.0, value - step) if op == ">" else value + step  # no "over -1"
    if column.kind != YEAR and bound >= 100:
        unit = 10 ** (len(str(int(bound))) - 2)  # keep two significant digits
        bound = (bound // unit) * unit if op == ">" else -((-bound) // unit) * unit
    return float(round(bound))


def _phrase(cond: Condition, column: ColumnSpec, style: str, key: bool, rng: random.Random) -> str:
    options = list({"clause": CLAUSE, "with": WITH, "verb": VERB}[style][cond.op])
    if style == "verb" and key:
        options = ["is {x}"]  # "the school that is Seattle High School"
    if style == "clause" and column.kind == YEAR:
        options += YEAR_CLAUSE.get(cond.op, ())
    if style != "clause" and column.counted:
        options += COUNTED.get(cond.op, ())
    if style == "verb" and column.verb:
        # Dates are text, compared only with "=": "was launched on March 3, 1999".
        options = ["was {verb} on {x}"] if column.kind == DATE else list(TIMED[cond.op])
    template = rng.choice(options)
    if column.said[0] in "aeiou":
        template = template.replace("a {p}", "an {p}")  # "an opponent of ..."
    return template.format(p=column.said, x=show(cond.value), verb=column.verb)


def _conditions(
    table: Table, row: tuple[str | float, ...], select: ColumnSpec, rng: random.Random
) -> tuple[Condition, ...]:
    candidates = [c for c in table.columns if c is not select]
    n = min(rng.choices((1, 2, 3), weights=(62, 28, 10))[0], len(candidates))
    conditions = []
    for column in rng.sample(candidates, n):
        value = row[table.columns.index(column)]
        op = "="
        if column.kind in NUMERIC_KINDS and rng.random() < 0.4:
            op = rng.choice((">", "<")) if float(value) > 0 else "<"  # nothing is over 0
            value = _threshold(column, float(value), op, rng)
        conditions.append(Condition(column.name, op, value))
    return tuple(conditions)


def _pick_query(table: Table, rng: random.Random) -> tuple[ColumnSpec, str | None]:
    numeric = [c for c in table.columns if c.kind in NUMERIC_KINDS]
    summable = [c for c in numeric if c.summable and c.kind != YEAR]
    key = next(c for c in table.columns if c.name == table.domain.key)
    agg = rng.choices((None, "COUNT", "MAX", "MIN", "SUM", "AVG"), (48, 16, 11, 11, 7, 7))[0]
    if agg in ("MAX", "MIN") and numeric:
        return rng.choice(numeric), agg
    if agg in ("SUM", "AVG") and summable:
        return rng.choice(summable), agg
    if agg == "COUNT":
        return (key if rng.random() < 0.6 else rng.choice(table.columns)), agg
    return (key if rng.random() < 0.3 else rng.choice(table.columns)), None


def _question(table: Table, rng: random.Random) -> tuple[str, Query]:
    """One question about ``table`` and its answer."""
    domain, row = table.domain, rng.choice(table.rows)
    select, agg = _pick_query(table, rng)
    conditions = () if rng.random() < 0.05 else _conditions(table, row, select, rng)
    query = Query(table.id, select.name, agg, conditions)
    spec = {c.name: c for c in table.columns}
    is_key = select.name == domain.key
    words = (YEAR_AGG_WORDS if select.kind == YEAR else AGG_WORDS).get(agg or "", ("",))
    if select.counted:
        words += COUNTED_AGG_WORDS.get(agg or "", ())
    fills = {"s": select.said, "e": domain.entity, "es": domain.entities, "a": rng.choice(words)}
    for style, letter in (("clause", "w"), ("with", "h")):
        fills[letter] = " and ".join(
            _phrase(c, spec[c.column], style, c.column == domain.key, rng) for c in conditions
        )
    verbs = [_phrase(c, spec[c.column], "verb", c.column == domain.key, rng) for c in conditions]
    fills["v"] = " and ".join(verbs)
    fills["vp"] = " and ".join(_plural(v) for v in verbs)  # "How many films were released"
    if not conditions:
        group = "AGG" if agg not in (None, "COUNT") else agg
        template = rng.choice(NO_CONDITION[group])
    elif agg is None and is_key:
        template = rng.choice(SELECT_KEY + (SELECT_WHO if domain.people else ()))
    elif agg is None:
        on_key = [c for c in conditions if c.column == domain.key and c.op == "="]
        if len(conditions) == 1 and on_key and rng.random() < 0.6:
            name = show(on_key[0].value)
            fills["k0"] = name
            fills["k"] = name + ("'" if name.endswith("s") else "'s")
            template = rng.choice(POSSESSIVE)
        else:
            template = rng.choice(SELECT)
    elif agg == "COUNT":
        template = rng.choice(COUNT_KEY if is_key else COUNT)
    else:
        template = rng.choice(AGGREGATE)
    text = template.format(**fills)
    # WikiSQL questions are often typed in lower case; the template's first word may be too.
    first = text[0].lower() if rng.random() < 0.2 else text[0].upper()
    return first + text[1:], query


def _table_examples(table: Table, rng: random.Random) -> list[str]:
    examples: dict[str, str] = {}  # question -> example; a table never asks the same thing twice
    for _ in range(rng.randint(2, 6)):
        question, query = _question(table, rng)
        examples.setdefault(question, f"{table.header()}\nQ: {question}\nA: {to_wikisql(query)}")
    return list(examples.values())


def _stream(
    seed: int, domains: Sequence[str] | None, exclude_domains: Sequence[str]
) -> Iterator[list[str]]:
    """The examples of one table after another, forever."""
    rng = random.Random(seed)
    for table in _tables(rng, _choose_domains(domains, exclude_domains)):
        yield _table_examples(table, rng)


def _take(tables: Iterator[list[str]], n: int) -> list[str]:
    taken: list[str] = []
    while len(taken) < n:
        taken += next(tables)[: n - len(taken)]
    return taken


def generate_examples(
    n: int,
    seed: int,
    domains: Sequence[str] | None = None,
    exclude_domains: Sequence[str] = (),
) -> list[str]:
    """``n`` examples in the seed format ``table: ...\\ncolumns: ...\\nQ: ...\\nA: SELECT ...``."""
    return _take(_stream(seed, domains, exclude_domains), n)


def generate_chat_examples(
    n: int,
    seed: int,
    domains: Sequence[str] | None = None,
    exclude_domains: Sequence[str] = (),
) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` examples as ``{"messages": [user, assistant]}`` chats."""
    return [to_chat(e) for e in generate_examples(n, seed, domains, exclude_domains)]


def write_dataset(
    out_dir: Path,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int,
    domains: Sequence[str] | None = None,
    exclude_domains: Sequence[str] = (),
    chat_fraction: float = 0.0,
) -> None:
    """Write train/valid/test.jsonl; no table appears in two splits.

    Each line is ``{"text": ...}``, or with probability ``chat_fraction`` ``{"messages": ...}``.
    """
    if not 0.0 <= chat_fraction <= 1.0:
        raise ValueError(f"chat_fraction must be between 0 and 1, got {chat_fraction}")
    if min(n_train, n_valid, n_test) < 0:
        raise ValueError("split sizes must be zero or more examples")
    tables = _stream(seed, domains, exclude_domains)
    chooser = random.Random(f"chat:{seed}")  # own stream: chat_fraction leaves the SQL unchanged
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = []
        for example in _take(tables, n):
            chat = chooser.random() < chat_fraction
            lines.append(json.dumps(to_chat(example) if chat else {"text": example}))
        (out_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
