"""WikiSQL notation: parse it, translate it to SQLite, and judge predictions by execution.

WikiSQL answers look like SQL but are not: column names are unquoted and may contain spaces,
slashes, dots and parentheses; aggregates are written ``SELECT COUNT School/Club Team``; values
are quoted with single quotes that are *not* escaped inside the value (``'Patrick O'Bryant'``) or
are bare numbers. This module is the one place that reads that notation; everything that runs
generated SQL goes through :func:`parse_query` and :func:`to_sqlite` (judging predictions by
running them is `mlx_core.eval.sql_scoring`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
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


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # a bare number value
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
        number = NUMBER.match(self.text, pos)
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


def sqlite_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str | float) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if not math.isfinite(value):  # a bare number too long for a float; SQLite reads 9e999 as inf
        return "9e999" if value > 0 else "-9e999"
    return str(int(value)) if value.is_integer() else repr(value)


def to_sqlite(query: Query) -> str:
    """The query as SQLite SQL with quoted identifiers and escaped string literals."""
    column = sqlite_identifier(query.select)
    select = f"{query.agg}({column})" if query.agg else column
    sql = f"SELECT {select} FROM {sqlite_identifier(query.table)}"
    if query.conditions:
        where = " AND ".join(
            f"{sqlite_identifier(c.column)} {c.op} {_literal(c.value)}" for c in query.conditions
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
