"""WikiSQL notation: parse it, translate it to SQLite, and judge predictions by execution.

WikiSQL answers look like SQL but are not: column names are unquoted and may contain spaces,
slashes, dots and parentheses; aggregates are written ``SELECT COUNT School/Club Team``; values
are quoted with single quotes that are *not* escaped inside the value (``'Patrick O'Bryant'``) or
are bare numbers. This module is the one place that reads that notation; everything that runs
generated SQL goes through :func:`parse_query` and :func:`to_sqlite`.
"""

from __future__ import annotations

import math
import random
import re
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass

AGGREGATES = ("COUNT", "MAX", "MIN", "SUM", "AVG")
OPERATORS = ("=", ">", "<")
MAX_CONDITIONS = 16  # WikiSQL has at most 4; the cap bounds the parser's recursion
_KEYWORDS = ("SELECT", "FROM", "WHERE", "AND", *AGGREGATES)


class SqlParseError(ValueError):
    """The SQL is not valid WikiSQL notation for the given table."""


class ExampleFormatError(ValueError):
    """The example text is not in the ``table: / columns: / Q: / A:`` format."""


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    value: str | float  # str when quoted in the SQL, float when written as a bare number


@dataclass(frozen=True)
class Query:
    table: str
    select: str
    agg: str | None
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class SqlExample:
    table: str
    columns: tuple[str, ...]
    question: str
    answer: str | None  # None for a prompt (no answer after "A:")


@dataclass(frozen=True)
class SqlScores:
    n: int
    exact: float  # fraction of predictions equal to the gold after normalization
    execution: float  # fraction whose results equal the gold's on synthesized tables


# --- examples -----------------------------------------------------------------------------------

_EXAMPLE_HINT = (
    "expected lines 'table: <id>', 'columns: <a>, <b>, ...', 'Q: <question>', 'A: <sql>'"
)


def parse_example(text: str) -> SqlExample:
    """Split a ``table:/columns:/Q:/A:`` example; ``answer`` is None when nothing follows "A:"."""
    lines = text.split("\n")
    if len(lines) < 3 or not lines[0].startswith("table:") or not lines[1].startswith("columns:"):
        raise ExampleFormatError(f"not a text-to-SQL example: {text[:80]!r}; {_EXAMPLE_HINT}")
    if not lines[2].startswith("Q:"):
        raise ExampleFormatError(f"third line must start with 'Q:', got {lines[2][:80]!r}")
    table = lines[0][len("table:") :].strip()
    columns = tuple(c.strip() for c in lines[1][len("columns:") :].split(", "))
    if not table or not all(columns):
        raise ExampleFormatError(
            f"empty table id or column name in {text[:120]!r}; {_EXAMPLE_HINT}"
        )
    rest = "\n".join(lines[2:])[len("Q:") :]
    question, sep, answer = rest.partition("\nA:")
    answer = answer.strip() if sep else ""
    return SqlExample(table, columns, question.strip(), answer or None)


def prompt_of(example_text: str) -> str:
    """The part of an example the model is given: everything up to and including "A:"."""
    q_at = example_text.find("\nQ:")
    a_at = example_text.find("\nA:", max(q_at, 0))
    if q_at < 0 or a_at < 0:
        raise ExampleFormatError(
            f"no 'Q:' line followed by an 'A:' line in {example_text[:80]!r}; {_EXAMPLE_HINT}"
        )
    return example_text[: a_at + len("\nA:")]


# --- parsing ------------------------------------------------------------------------------------


def _column_candidates(columns: Sequence[str]) -> dict[str, str]:
    """Lower-cased name -> canonical name, longest names first.

    The ``columns:`` line joins names with ", ", so a real column such as "Power, continuous" is
    listed as two entries; runs of consecutive entries are therefore candidates too. A run only
    matches if the SQL literally contains it, so this cannot mis-read a normal query.
    """
    names: dict[str, str] = {}
    for start in range(len(columns)):
        for stop in range(start + 1, len(columns) + 1):
            name = ", ".join(columns[start:stop])
            names.setdefault(name.lower(), name)
    return dict(sorted(names.items(), key=lambda kv: -len(kv[0])))


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)
_OP = re.compile(r"\s*(=|>|<)(?![=>])\s*")


class _Parser:
    """Backtracking reader: column names and quoted values are ambiguous without lookahead."""

    def __init__(self, sql: str, columns: Sequence[str], table: str | None) -> None:
        self.text = sql
        self.lower = sql.lower()
        self.columns = _column_candidates(columns)
        self.listed = ", ".join(columns)
        self.table = table
        self.furthest = (-1, "")  # where parsing got furthest and what it expected there
        self.memo: dict[tuple[int, int], tuple[Condition, ...] | None] = {}

    def expect(self, pos: int, what: str) -> None:
        if pos > self.furthest[0]:
            self.furthest = (pos, what)

    def columns_at(self, pos: int) -> list[tuple[str, int]]:
        found = [
            (name, pos + len(low))
            for low, name in self.columns.items()
            if self.lower.startswith(low, pos)
        ]
        if not found:
            self.expect(pos, f"a column name from: {self.listed}")
        return found

    def parse(self) -> Query:
        head = re.match(r"\s*select\s+", self.text, re.IGNORECASE)
        if head is None:
            raise SqlParseError(
                f"{self.text[:60]!r} does not start with SELECT; write 'SELECT ...'"
            )
        pos = head.end()
        agg = re.match(r"(count|max|min|sum|avg)(\s*\(\s*|\s+)", self.text[pos:], re.IGNORECASE)
        # "SELECT Count FROM t" may name a column called Count, so both readings are tried.
        readings: list[tuple[str | None, int, bool]] = []
        if agg:
            readings.append((agg.group(1).upper(), pos + agg.end(), "(" in agg.group(2)))
        readings.append((None, pos, False))
        for agg_name, start, paren in readings:
            for column, end in self.columns_at(start):
                if paren:
                    close = re.match(r"\s*\)", self.text[end:])
                    if close is None:
                        self.expect(end, "')' after the aggregated column")
                        continue
                    end += close.end()
                query = self.after_select(agg_name, column, end)
                if query is not None:
                    return query
        pos, what = self.furthest
        raise SqlParseError(
            f"cannot read WikiSQL at position {pos} ({self.text[pos : pos + 30]!r}) of "
            f"{self.text!r}: expected {what}"
        )

    def after_select(self, agg: str | None, column: str, pos: int) -> Query | None:
        m = re.match(r"\s+from\s+", self.text[pos:], re.IGNORECASE)
        if m is None:
            self.expect(pos, "' FROM <table>' after the selected column")
            return None
        pos += m.end()
        word = re.match(r"\S+", self.text[pos:])
        if word is None:
            self.expect(pos, "a table id after FROM")
            return None
        table = word.group(0)
        if self.table is not None:
            if table.lower() != self.table.lower():
                self.expect(pos, f"table {self.table} (the example's table id), not {table}")
                return None
            table = self.table
        pos += word.end()
        if pos == len(self.text):
            return Query(table, column, agg, ())
        m = re.match(r"\s+where\s+", self.text[pos:], re.IGNORECASE)
        if m is None:
            self.expect(pos, "' WHERE <column> <op> <value>' or the end of the query")
            return None
        conditions = self.conditions(pos + m.end())
        return None if conditions is None else Query(table, column, agg, conditions)

    def conditions(self, pos: int, depth: int = 1) -> tuple[Condition, ...] | None:
        # Memoized: a quoted value may end at any later quote, and without the memo a long
        # malformed prediction would make the backtracking exponential.
        if depth > MAX_CONDITIONS:
            self.expect(pos, f"the end of the query: at most {MAX_CONDITIONS} conditions")
            return None
        if (pos, depth) not in self.memo:
            self.memo[pos, depth] = self._conditions(pos, depth)
        return self.memo[pos, depth]

    def _conditions(self, pos: int, depth: int) -> tuple[Condition, ...] | None:
        for column, end in self.columns_at(pos):
            op = _OP.match(self.text, end)
            if op is None:
                self.expect(end, "an operator (=, > or <) after the column")
                continue
            for value, after in self.values_at(op.end()):
                rest = self.rest_after_value(after, depth)
                if rest is not None:
                    return (Condition(column, op.group(1), value), *rest)
        return None

    def values_at(self, pos: int) -> list[tuple[str | float, int]]:
        if self.text.startswith("'", pos):
            # Quotes inside WikiSQL values are not escaped, so every later quote may close it;
            # the caller keeps the first one after which the rest of the query parses.
            ends = [m.start() for m in re.finditer("'", self.text[pos + 1 :])]
            if not ends:
                self.expect(len(self.text), "a closing single quote after the value")
            return [
                (self.text[pos + 1 : pos + 1 + e].replace("''", "'"), pos + e + 2) for e in ends
            ]
        number = _NUMBER.match(self.text, pos)
        if number is None:
            self.expect(pos, "a value: a number or text in single quotes like 'Ann Lee'")
            return []
        return [(float(number.group(0)), number.end())]

    def rest_after_value(self, pos: int, depth: int) -> tuple[Condition, ...] | None:
        if pos == len(self.text):
            return ()
        m = _AND.match(self.text, pos)
        if m is None:
            self.expect(pos, "' AND <column> <op> <value>' or the end of the query")
            return None
        return self.conditions(m.end(), depth + 1)


def _strip_sql(sql: str) -> str:
    return sql.strip().rstrip(";").rstrip()


def parse_query(sql: str, columns: Sequence[str], table: str | None = None) -> Query:
    """Read WikiSQL notation against the table's columns; raises SqlParseError saying where.

    Column names are matched case-insensitively, longest first (names contain spaces); keyword
    case, extra whitespace and a trailing ";" are tolerated. With ``table`` given, the query must
    read from that table.
    """
    if not columns:
        raise SqlParseError("no columns given; pass the names from the example's 'columns:' line")
    return _Parser(_strip_sql(sql), columns, table).parse()


# --- SQLite -------------------------------------------------------------------------------------


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str | float) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if not math.isfinite(value):  # a bare number too long for a float; SQLite reads 9e999 as inf
        return "9e999" if value > 0 else "-9e999"
    return str(int(value)) if value.is_integer() else repr(value)


def to_sqlite(query: Query) -> str:
    """The query as SQLite SQL with quoted identifiers and escaped string literals."""
    column = _identifier(query.select)
    select = f"{query.agg}({column})" if query.agg else column
    sql = f"SELECT {select} FROM {_identifier(query.table)}"
    if query.conditions:
        where = " AND ".join(
            f"{_identifier(c.column)} {c.op} {_literal(c.value)}" for c in query.conditions
        )
        sql += f" WHERE {where}"
    return sql


def to_wikisql(query: Query) -> str:
    """The query in WikiSQL notation, as the model writes it (the inverse of parse_query)."""

    def value(v: str | float) -> str:
        # WikiSQL leaves quotes inside values unescaped; parse_query reads them back.
        return f"'{v}'" if isinstance(v, str) else _literal(v)

    select = f"{query.agg} {query.select}" if query.agg else query.select
    sql = f"SELECT {select} FROM {query.table}"
    if query.conditions:
        sql += " WHERE " + " AND ".join(
            f"{c.column} {c.op} {value(c.value)}" for c in query.conditions
        )
    return sql


# --- execution match ----------------------------------------------------------------------------

_LOW, _MIDDLE, _FILLER, _HIGH = (100, 999), (1000, 9999), (10_000, 99_999), (100_000, 999_999)
_FILLER_WORDS = ("Amber", "Birch", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Harbor")


def _as_number(value: str | float) -> float | None:
    if isinstance(value, float):
        return value
    return float(value) if _NUMBER.fullmatch(value.strip()) else None


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
    schema = ", ".join(f"{_identifier(c)} NUMERIC COLLATE {_COLLATION}" for c in columns)
    table = _identifier(example.table)
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


# --- exact match --------------------------------------------------------------------------------


def _closes_string(text: str, at: int) -> bool:
    """Whether the quote at ``at`` ends a value: only the end, ';' or AND may follow it."""
    rest = text[at + 1 :]
    return not rest.strip(" ;") or _AND.match(rest) is not None


def _normalize(sql: str) -> str:
    """Whitespace collapsed and keywords upper-cased outside quoted values, which stay verbatim."""
    text = _strip_sql(sql)
    parts: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "'":
            j = i + 1
            while j < len(text) and not (text[j] == "'" and _closes_string(text, j)):
                j += 1
            parts.append(text[i : j + 1])
            i = j + 1
        else:
            j = text.find("'", i)
            j = len(text) if j < 0 else j
            words = re.sub(r"\s+", " ", text[i:j]).split(" ")
            parts.append(" ".join(w.upper() if w.upper() in _KEYWORDS else w for w in words))
            i = j
    return "".join(parts)


def exact_match(predicted_sql: str, gold_sql: str) -> bool:
    """Equal after normalizing whitespace and keyword case outside values and a trailing ";"."""
    return _normalize(predicted_sql) == _normalize(gold_sql)


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
