"""Judging predicted WikiSQL answers against the gold by execution (exact match: `mlx_core.eval.wikisql`).

Execution match builds small SQLite tables whose rows are made to satisfy (and to fail) the
gold's and the prediction's conditions, runs both queries (translated by `mlx_core.eval.wikisql`), and
compares the results, so two different spellings of the same query agree and a wrong one almost
never does by chance.
"""

from __future__ import annotations

import math
import random
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass

from mlx_core.eval.wikisql import (
    AGGREGATES,
    NUMBER,
    Condition,
    ExampleFormatError,
    Query,
    SqlExample,
    SqlParseError,
    exact_match,
    parse_example,
    parse_query,
    sqlite_identifier,
    to_sqlite,
)


@dataclass(frozen=True)
class SqlScores:
    n: int
    exact: float  # fraction of predictions equal to the gold after normalization
    execution: float  # fraction whose results equal the gold's on synthesized tables


# --- execution match ----------------------------------------------------------------------------

_LOW, _MIDDLE, _FILLER, _HIGH = (100, 999), (1000, 9999), (10_000, 99_999), (100_000, 999_999)
_FILLER_WORDS = ("Amber", "Birch", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Harbor")


def _as_number(value: str | float) -> float | None:
    if isinstance(value, float):
        return value
    return float(value) if NUMBER.fullmatch(value.strip()) else None


def _store(number: float) -> int | float:
    # Integers SQLite cannot hold in 64 bits stay floats instead of overflowing on insert.
    return int(number) if number.is_integer() and abs(number) < 2**62 else number


def _holds(value: object, cond: Condition) -> bool:
    """Python mirror of the SQLite comparison, used only to pick which rows to synthesize."""
    target = _as_number(cond.value)
    if isinstance(value, int | float):
        if target is None:
            return cond.op == "<"  # SQLite orders every number before every text
        left = float(value)
        return {"=": left == target, ">": left > target, "<": left < target}[cond.op]
    if target is not None:
        return cond.op == ">"
    a, b = str(value).casefold(), str(cond.value).casefold()  # as _compare_folded
    return {"=": a == b, ">": a > b, "<": a < b}[cond.op]


def _fits(
    value: object, need: Sequence[Condition], broken: Condition | None, avoid: Sequence[Condition]
) -> bool:
    """Meets every ``need``, fails ``broken``, and fails at least one of ``avoid`` (if any)."""
    if not all(_holds(value, c) for c in need):
        return False
    if broken is not None and _holds(value, broken):
        return False
    return not avoid or not all(_holds(value, c) for c in avoid)


def _column_kinds(query: Query) -> dict[str, str]:
    """What the query says about each column: "number" (compared with a number, with > or <,
    or aggregated by MAX/MIN/SUM/AVG) or "text" (only compared with text)."""
    kinds: dict[str, str] = {}
    if query.agg in AGGREGATES[1:]:
        kinds[query.select] = "number"
    for cond in query.conditions:
        numeric = cond.op != "=" or _as_number(cond.value) is not None
        if numeric or cond.column not in kinds:
            kinds[cond.column] = "number" if numeric else "text"
    return kinds


class _RowMaker:
    """Synthesizes rows that tell apart two queries over one table.

    For each query: a batch of rows that satisfy all its conditions, and for each condition two
    near misses that break only that one; then random filler. Constrained columns take the
    literals of both queries and their neighbours first (the boundary of "> 5", 4 and 6), then
    fresh values; rows within a batch differ where they can, so aggregates over them differ.
    """

    def __init__(self, columns: Sequence[str], gold: Query, predicted: Query, rng: random.Random):
        self.rng = rng
        self.columns = list(columns)
        self.numbers: dict[str, list[float]] = {c: [] for c in columns}
        self.near: dict[str, list[object]] = {c: [] for c in columns}
        # A column holds numbers or text, as in a real table; the gold decides which, so a
        # prediction comparing a numeric column with text matches no row instead of planting
        # text among the numbers.
        gold_kind, predicted_kind = _column_kinds(gold), _column_kinds(predicted)
        self.numeric = {
            c: gold_kind.get(c, predicted_kind.get(c, "text")) == "number" for c in columns
        }
        for query in (gold, predicted):
            for cond in query.conditions:
                n = _as_number(cond.value)
                if n is None and self.numeric[cond.column] and query is not gold:
                    continue
                if n is None:
                    self.near[cond.column].append(cond.value)
                    continue
                # The literal and the values either side of it.
                step = 1.0 if n.is_integer() else 0.5
                self.near[cond.column] += [_store(n + d) for d in (-step, 0.0, step)]
                self.numbers[cond.column].append(n)

    def fresh(self, column: str, band: tuple[int, int], near_literals: bool) -> object:
        if not self.numeric[column]:
            return f"{self.rng.choice(_FILLER_WORDS)} {self.rng.randint(10, 9999)}"
        numbers = self.numbers[column]
        if near_literals and numbers and self.rng.random() < 0.7:
            n = self.rng.choice(numbers)
            step = 1.0 if n.is_integer() else 0.5
            return _store(n + self.rng.choice((-1, 1)) * self.rng.randint(1, 300) * step)
        return self.rng.randint(*band)

    def batch(
        self,
        k: int,
        band: tuple[int, int],
        query: Query | None,
        broken: Condition | None = None,
        other: Query | None = None,
    ) -> list[list[object]]:
        """``k`` rows satisfying ``query`` except ``broken``.

        On the columns ``query`` leaves free the rows miss ``other``'s conditions, so a row
        satisfies only the queries it was built for and their row counts stay different.
        """
        by_column = []
        for column in self.columns:
            mine = [c for c in query.conditions if c.column == column] if query else []
            need = [c for c in mine if c is not broken]
            breaks = broken if broken in mine else None
            avoid = [c for c in other.conditions if c.column == column] if other else []
            if mine or not avoid:
                avoid = []
            if not mine and not avoid:
                by_column.append([self.fresh(column, band, False) for _ in range(k)])
                continue

            near = [v for v in dict.fromkeys(self.near[column]) if _fits(v, need, breaks, avoid)]
            self.rng.shuffle(near)
            fresh = [self.fresh(column, band, True) for _ in range(2 * k + 2)]
            # Values next to the literals come first, so boundaries such as "> 5" against "> 6"
            # always get a row that only one of the two queries selects.
            fresh = [v for v in fresh if _fits(v, need, breaks, avoid)]
            picks = list(dict.fromkeys(near + fresh))[:k]
            while len(picks) < k:  # an "=" leaves one value; a contradiction leaves none
                picks.append(self.rng.choice(picks) if picks else self.fresh(column, band, True))
            self.rng.shuffle(picks)
            by_column.append(picks)
        return [list(row) for row in zip(*by_column, strict=True)]

    def rows(self, gold: Query, predicted: Query) -> list[list[object]]:
        # Unconstrained numbers come from a different magnitude band per kind of row, so MAX,
        # MIN, SUM and AVG over rows that satisfy a query differ from the same aggregate over
        # a set that also holds its near misses (a prediction missing a condition).
        rows: list[list[object]] = []
        # Each query gets its own number of satisfying rows, so COUNT tells apart queries that
        # select different rows.
        sizes = self.rng.sample(range(2, 7), 2)
        for query, other, size in ((gold, predicted, sizes[0]), (predicted, gold, sizes[1])):
            rows += self.batch(size, _MIDDLE, query, other=other)
            for cond in query.conditions:
                rows += self.batch(1, _LOW, query, broken=cond, other=other)
                rows += self.batch(1, _HIGH, query, broken=cond, other=other)
        for _ in range(self.rng.randint(6, 16)):
            rows += self.batch(1, _FILLER, None)
        return rows


def _sort_key(value: object) -> tuple[int, float, str]:
    if isinstance(value, int | float):
        return (0, float(value), "")
    return (1, 0.0, repr(value))


def _same_results(a: list[tuple[object, ...]], b: list[tuple[object, ...]]) -> bool:
    if len(a) != len(b):
        return False
    a_sorted = sorted(a, key=lambda row: [_sort_key(v) for v in row])
    b_sorted = sorted(b, key=lambda row: [_sort_key(v) for v in row])
    for row_a, row_b in zip(a_sorted, b_sorted, strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            if isinstance(x, int | float) and isinstance(y, int | float):
                if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9):
                    return False
            elif x != y:
                return False
    return True


def _table_columns(example: SqlExample, queries: Sequence[Query]) -> list[str]:
    """Listed columns plus comma-joined names the queries use, one per SQLite name."""
    names: dict[str, str] = {}
    used = [q.select for q in queries] + [c.column for q in queries for c in q.conditions]
    for name in [*example.columns, *used]:
        names.setdefault(name.lower(), name)  # SQLite column names are case-insensitive
    return list(names.values())


_TABLES_PER_MATCH = 3
_COLLATION = "FOLDED"


def _compare_folded(a: str, b: str) -> int:
    """Text order ignoring case, for all of Unicode (SQLite's NOCASE folds only ASCII), as
    WikiSQL's evaluation lower-cases values before comparing."""
    a, b = a.casefold(), b.casefold()
    return (a > b) - (a < b)


def _run(db: sqlite3.Connection, query: Query) -> list[tuple[object, ...]]:
    return db.execute(to_sqlite(query)).fetchall()


def execution_match(example: SqlExample, predicted_sql: str, gold_sql: str, seed: int = 0) -> bool:
    """True when both queries return the same multiset of rows on synthesized tables.

    The table gets the example's columns and rows built to separate the two queries (see
    _RowMaker); text comparisons ignore case, as in WikiSQL's own evaluation. A prediction that
    does not parse or run gives False; a gold answer that does not parse raises SqlParseError.
    """
    gold = parse_query(gold_sql, example.columns, example.table)
    try:
        predicted = parse_query(predicted_sql, example.columns, example.table)
    except SqlParseError:
        return False
    queries = [gold, predicted]
    columns = _table_columns(example, queries)
    # NUMERIC affinity stores numeric-looking text as numbers, so '3' and 3 compare equal and
    # > / < compare numerically; the collation makes 'ÖSTERREICHRING' = 'Österreichring'.
    schema = ", ".join(f"{sqlite_identifier(c)} NUMERIC COLLATE {_COLLATION}" for c in columns)
    table = sqlite_identifier(example.table)
    insert = f"INSERT INTO {table} VALUES ({', '.join('?' for _ in columns)})"
    # Several independent tables: a wrong query that agrees with the gold on one table by chance
    # (say, the same row count) is very unlikely to agree on all of them.
    for table_no in range(_TABLES_PER_MATCH):
        rng = random.Random(f"{seed}\x00{table_no}\x00{gold_sql}\x00{predicted_sql}")
        rows = _RowMaker(columns, gold, predicted, rng).rows(gold, predicted)
        with closing(sqlite3.connect(":memory:")) as db:
            db.create_collation(_COLLATION, _compare_folded)
            db.execute(f"CREATE TABLE {table} ({schema})")
            db.executemany(insert, rows)
            expected = _run(db, gold)  # errors here are bugs in this module, so they propagate
            try:
                got = _run(db, predicted)
            except sqlite3.Error:
                return False
        if not _same_results(expected, got):
            return False
    return True


def score_predictions(examples: Sequence[str], predictions: Sequence[str]) -> SqlScores:
    """Exact and execution accuracy of ``predictions`` (SQL only) against the examples' answers."""
    if len(examples) != len(predictions):
        raise ValueError(
            f"{len(examples)} examples but {len(predictions)} predictions; pass one prediction "
            "per example, in the same order"
        )
    if not examples:
        raise ValueError("no examples to score; check that the evaluation file is not empty")
    exact = execution = 0
    for text, predicted in zip(examples, predictions, strict=True):
        example = parse_example(text)
        if example.answer is None:
            raise ExampleFormatError(
                f"example for table {example.table} has no answer after 'A:'; score only "
                "examples that carry their gold SQL"
            )
        exact += exact_match(predicted, example.answer)
        execution += execution_match(example, predicted, example.answer)
    n = len(examples)
    return SqlScores(n=n, exact=exact / n, execution=execution / n)
