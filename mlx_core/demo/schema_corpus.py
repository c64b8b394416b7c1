"""The schema-reading text-to-SQL corpus: random tables, questions that name their columns.

Every table is new: its id, its 3-10 columns (names from an open vocabulary, in random order)
and its values are drawn afresh, and a column's name says nothing about its values. A model can
only answer by reading: the SELECT and WHERE columns are copied from the header (the question
says them as written, lower-cased or in part), the values copied verbatim from the question.

Parts (`PARTS`) split what is trained from what is measured: "train" (training words and
phrasings), "vocabulary" (held-out words: every column and value is new to the model),
"phrasing" (held-out question templates and condition forms) and "french" (a whole question
style the base model never sees, for the fine-tuning showcase). Examples use the WikiSQL seed
format and notation (`mlx_core.eval.wikisql`), deterministic from the seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlx_core.demo.columns import (
    NUMBER,
    Column,
    MadeUp,
    Vocabulary,
    number,
    show,
    table_columns,
    table_id,
    text_value,
)
from mlx_core.demo.phrasings import STYLES, Phrasing
from mlx_core.eval.wikisql import Condition, Query, to_wikisql

HELD_OUT_FRACTION = 0.12  # of every word list; the split is by a hash of each word
PARTS = {  # part -> (held-out vocabulary?, phrasing style)
    "train": (False, "english"),
    "vocabulary": (True, "english"),
    "phrasing": (False, "held-out"),
    "french": (False, "french"),
}


@dataclass(frozen=True)
class Table:
    id: str
    columns: tuple[Column, ...]

    def header(self) -> str:
        return f"table: {self.id}\ncolumns: {', '.join(c.name for c in self.columns)}"


# -- how a question says a column -----------------------------------------------------------------
def said(column: str, table: Table, rng: random.Random) -> str:
    """The column as the question writes it: as in the header, lower-cased, or a unique part."""
    low = column.lower()
    shape = rng.random()
    if shape < 0.35:
        return column
    forms = [low]
    bare = re.sub(r"\s*\([^)]*\)$", "", low)  # "height (m)" -> "height"
    if bare != low:
        forms.append(bare)
    if low.startswith("# of "):
        forms.append("number of " + low[5:])
    words = bare.split(" ")
    if len(words) > 1 and shape > 0.8:
        # WikiSQL's questions often name a column in part; only a part no other column has
        others = [c.name.lower() for c in table.columns if c.name != column]
        for part in (words[-1], words[0], " ".join(words[1:])):
            if len(part) > 2 and not any(part in o for o in others):
                forms.append(part)
                break
    return rng.choice(forms)


# -- queries ------------------------------------------------------------------------------------
def _conditions(
    table: Table, select: Column, v: Vocabulary, rng: random.Random, n: int
) -> list[Condition]:
    others = [c for c in table.columns if c is not select] or list(table.columns)
    conditions = []
    for column in rng.sample(others, min(n, len(others))):
        if column.kind == NUMBER:
            op = rng.choices(("=", ">", "<"), (50, 25, 25))[0]
            value = number(rng)
            # WikiSQL quotes the numbers it compares with "=" and leaves the others bare
            conditions.append(Condition(column.name, op, show(value) if op == "=" else value))
        else:
            conditions.append(Condition(column.name, "=", text_value(rng, v, column.typed)))
    return conditions


def _pick_select(table: Table, rng: random.Random) -> tuple[Column, str | None]:
    numeric = [c for c in table.columns if c.kind == NUMBER]
    agg = rng.choices((None, "COUNT", "MAX", "MIN", "SUM", "AVG"), (50, 16, 10, 10, 7, 7))[0]
    if agg in ("MAX", "MIN", "SUM", "AVG"):
        if not numeric:
            agg = None
        else:
            return rng.choice(numeric), agg
    return rng.choice(table.columns), agg


def _condition_text(cond: Condition, table: Table, style: Phrasing, rng: random.Random) -> str:
    forms = {"=": style.equals, ">": style.greater, "<": style.less}[cond.op]
    template = rng.choice(forms)
    return template.replace("{p}", said(cond.column, table, rng)).replace("{x}", show(cond.value))


def _unsaid(cond: Condition, table: Table) -> bool:
    """Whether the condition's column may go unsaid: the one column named for its value's kind."""
    typed = next(c.typed for c in table.columns if c.name == cond.column)
    return typed is not None and sum(c.typed == typed for c in table.columns) == 1


def question(table: Table, v: Vocabulary, style: Phrasing, rng: random.Random) -> tuple[str, Query]:
    """One question about `table` and its answer."""
    select, agg = _pick_select(table, rng)
    n = rng.choices((0, 1, 2, 3), (5, 64, 26, 5))[0]
    if not style.no_condition:
        n = max(n, 1)
    conditions = _conditions(table, select, v, rng, n)
    s = said(select.name, table, rng)
    a = rng.choice(style.agg_words[agg]) if agg and agg != "COUNT" else ""
    if not conditions:
        template = rng.choice(style.count_all if agg == "COUNT" else style.no_condition)
        if agg is None:
            agg, a = "MAX", rng.choice(style.agg_words["MAX"])  # "what is the highest ..."
            if select.kind != NUMBER:
                agg, template = "COUNT", rng.choice(style.count_all)
    else:
        templates = {None: style.select, "COUNT": style.count}.get(agg, style.aggregate)
        template = rng.choice(templates)
    c = rng.choice(style.joiners).join(_condition_text(k, table, style, rng) for k in conditions)
    implicit = {None: style.implicit, "COUNT": style.implicit_count}.get(agg, ())
    if implicit and len(conditions) == 1 and _unsaid(conditions[0], table) and rng.random() < 0.5:
        template, c = rng.choice(implicit), show(conditions[0].value)
        template = template.replace("{x}", "{c}")
    text = template.replace("{s}", s).replace("{a}", a).replace("{c}", c)
    text = re.sub(r" {2,}", " ", text).strip()
    # WikiSQL's questions are typed every which way: capitalised or not, with "?" or without.
    if rng.random() < 0.65:
        text = text[:1].upper() + text[1:]
    text += rng.choices(("?", "", ".", " ?"), (62, 30, 5, 3))[0]
    if rng.random() < 0.08:  # all in lower case, values too (the answer copies them so)
        text = text.lower()
        conditions = [
            Condition(k.column, k.op, k.value.lower() if isinstance(k.value, str) else k.value)
            for k in conditions
        ]
    return text, Query(table.id, select.name, agg, tuple(conditions))


def _tables(rng: random.Random, v: Vocabulary) -> Iterator[Table]:
    seen: set[str] = set()
    while True:
        tid = table_id(rng, v)
        if tid in seen:
            continue
        seen.add(tid)
        yield Table(tid, tuple(table_columns(rng, v)))


def _stream(seed: int, part: str, made_up: MadeUp | None = None) -> Iterator[list[str]]:
    """The examples of one table after another, forever. `made_up` changes the "train" part
    alone: the measured parts always use `MadeUp()`, so their sets stay comparable."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from: {', '.join(PARTS)}")
    held_vocabulary, style_name = PARTS[part]
    share = made_up if made_up is not None and part == "train" else MadeUp()
    v = Vocabulary.part(held_vocabulary, HELD_OUT_FRACTION, share)
    style = STYLES[style_name]
    rng = random.Random(f"schema-corpus:{part}:{seed}")
    for table in _tables(rng, v):
        examples: dict[str, str] = {}  # a table never asks the same thing twice
        for _ in range(rng.randint(2, 5)):
            q, query = question(table, v, style, rng)
            if all(show(c.value) in q for c in query.conditions):  # a value another ran over
                examples.setdefault(q, f"{table.header()}\nQ: {q}\nA: {to_wikisql(query)}")
        yield list(examples.values())


def _take(tables: Iterator[list[str]], n: int) -> list[str]:
    taken: list[str] = []
    while len(taken) < n:
        taken += next(tables)[: n - len(taken)]
    return taken


def generate_examples(
    n: int, seed: int, part: str = "train", made_up: MadeUp | None = None
) -> list[str]:
    """`n` examples of `part` in the seed format ``table: ...\\ncolumns: ...\\nQ: ...\\nA: ...``."""
    return _take(_stream(seed, part, made_up), n)


def to_chat(example: str) -> dict[str, list[dict[str, str]]]:
    """An example as a chat: the user sends table, columns and question; the assistant the SQL."""
    prompt, _, sql = example.rpartition("\nA: ")
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": sql},
        ]
    }


def write_dataset(
    out_dir: Path,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int,
    part: str = "train",
    chat_fraction: float = 0.0,
    made_up: MadeUp | None = None,
) -> None:
    """Write train/valid/test.jsonl of `part`; no table appears in two splits.

    Each line is ``{"text": ...}``, or with probability ``chat_fraction`` ``{"messages": ...}``.
    """
    if not 0.0 <= chat_fraction <= 1.0:
        raise ValueError(f"chat_fraction must be between 0 and 1, got {chat_fraction}")
    if min(n_train, n_valid, n_test) < 0:
        raise ValueError("split sizes must be zero or more examples")
    tables = _stream(seed, part, made_up)
    chooser = random.Random(f"chat:{seed}")  # own stream: chat_fraction leaves the SQL unchanged
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = []
        for example in _take(tables, n):
            chat = chooser.random() < chat_fraction
            lines.append(json.dumps(to_chat(example) if chat else {"text": example}))
        (out_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
