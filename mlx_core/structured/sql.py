"""SQL grounded in the schema a request sends: Lark grammars that admit only its tables and columns.

Two dialects:
- `wikisql_grammar(table, columns)`: WikiSQL's notation over exactly one table, the language the
  default model writes: `SELECT [COUNT|MIN|MAX|SUM|AVG ]<column> FROM <table>[ WHERE <column>
  <op> <value>( AND ...)*]`, op `=`, `>` or `<`, value a single-quoted string or a number.
  `values_from` restricts string values to spans of words of the question (WikiSQL copies its
  values from the question).
- `sqlite_grammar(tables)`: plain SQLite SELECTs over several tables, identifiers always in
  double quotes: joins, WHERE with AND/OR, GROUP BY, ORDER BY, LIMIT.

`schema_from_prompt` reads the `table:` / `columns:` lines a prompt carries. Each grammar is a Lark
text for `constraints.lark_grammar`, with an optional leading space: after "A:" the model
writes " SELECT".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mlx_core.eval.wikisql import AGGREGATES, OPERATORS
from mlx_core.structured.constraints import ConstraintError

MAX_VALUE_WORDS = 8  # a value copied from the question spans at most this many words
MAX_CONDITIONS = 4  # WikiSQL's most; more only makes room for a runaway answer
_NUMBER = r"/-?[0-9]+(\.[0-9]+)?/"


@dataclass(frozen=True)
class TableSchema:
    table: str
    columns: tuple[str, ...]


def _literal(text: str) -> str:
    # A Lark string literal; JSON's escaping is a subset Lark reads the same way.
    return json.dumps(text, ensure_ascii=False)


def _alternatives(items: Sequence[str]) -> str:
    # Longest first: when one name is a prefix of another ("Position", "Position (m)") both
    # stay reachable either way, but the listing reads like the lexer's choice.
    return " | ".join(_literal(i) for i in sorted(set(items), key=lambda s: (-len(s), s)))


def _check_names(kind: str, names: Sequence[str]) -> None:
    if not names:
        raise ConstraintError("sql", f"the SQL constraint needs at least one {kind}")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConstraintError("sql", f"every {kind} must be a non-empty string, got {name!r}")
        if "\n" in name:
            raise ConstraintError("sql", f"{kind} {name!r} holds a line break: remove it")


def question_spans(question: str, max_words: int = MAX_VALUE_WORDS) -> list[str]:
    """Every run of up to `max_words` consecutive words of the question, as a value may copy it.

    Punctuation is trimmed at a run's ends only, so "May 7, 1995" and "E. Dybais" keep their
    inner comma and period; a run ending "'s" or "." also gives the run without it ("Anneck's"
    -> "Anneck", "Jr.." -> "Jr.").
    """
    words = question.split()
    spans: set[str] = set()
    for i in range(len(words)):
        for j in range(i + 1, min(len(words), i + max_words) + 1):
            spans.update(_value_forms(" ".join(words[i:j])))
    # A quote between two letters ("O'Brien") is part of a value; any other would read as the
    # value's closing quote.
    return sorted(s for s in spans if s and not _LONE_QUOTE.search(s))


_LONE_QUOTE = re.compile(r"(?<![A-Za-z])'|'(?![A-Za-z])")


def _value_forms(span: str) -> set[str]:
    trimmed = span.strip("?!,;:\"'")
    forms = {trimmed}
    if trimmed.endswith("'s"):
        forms.add(trimmed[:-2])
    if trimmed.endswith("."):
        forms.update((trimmed[:-1], trimmed.rstrip(".")))
    return {f.strip("?!,;:\"'") for f in forms}


def wikisql_grammar(table: str, columns: Sequence[str], values_from: str | None = None) -> str:
    """Lark text admitting WikiSQL notation over `table` and `columns` only (see the module)."""
    _check_names("table", [table])
    _check_names("column", list(columns))
    if values_from is not None:
        spans = question_spans(values_from)
        text = f'"\'" ({_alternatives(spans)}) "\'"' if spans else "NUMBER"
    else:
        # WikiSQL's values are short (a bound ends runaway rows); a quote before a letter is
        # inside the value ("O'Brien"), any other ends it
        text = "/'([^'\\n]|'[A-Za-z]){1,60}'/"
    aggregates = " | ".join(f'"{a} "' for a in AGGREGATES)
    operators = " | ".join(f'"{o}"' for o in OPERATORS)
    more = ' (" AND " cond)?' * (MAX_CONDITIONS - 1)
    # Each column is one lexeme with the space after it: the lexer ends a lexeme only where the
    # next byte cannot extend any other, so with "Winner" and "Winner 1413" as lexemes and the
    # space apart, "Winner =" could never be written (at "Winner " it had committed to the
    # longer name and does not back up).
    return "\n".join(
        [
            f'start: " "? "SELECT " agg? column "FROM " {_literal(table)} where?',
            f"agg: {aggregates}",
            f"column: {_alternatives([c + ' ' for c in columns])}",
            f'where: " WHERE " cond{more}',
            'cond: column op " " value',
            f"op: {operators}",
            "value: string | NUMBER",
            f"string: {text}",
            f"NUMBER: {_NUMBER}",
        ]
    )


_TABLE_LINE = re.compile(r"^table:\s*(.+?)\s*$", re.M)
_COLUMNS_LINE = re.compile(r"^columns:\s*(.+?)\s*$", re.M)


def schema_from_prompt(text: str) -> TableSchema:
    """The last `table:` line and the `columns:` line after it (comma-separated) of a prompt."""
    tables = list(_TABLE_LINE.finditer(text))
    if not tables:
        raise ConstraintError(
            "sql",
            '"from_prompt" needs a line "table: <name>" and a line "columns: <a>, <b>, ..." in '
            "the prompt (or the last user message): add them, or send "
            '{"table": ..., "columns": [...]} instead',
        )
    last = tables[-1]
    columns = _COLUMNS_LINE.search(text, last.end())
    if columns is None:
        raise ConstraintError(
            "sql", f'the prompt has "table: {last.group(1)}" but no "columns: ..." line after it'
        )
    names = tuple(c.strip() for c in columns.group(1).split(",") if c.strip())
    return TableSchema(last.group(1), names)


def question_from_prompt(text: str) -> str | None:
    """The question after the last `Q:` of a prompt, if any (for `values_from`)."""
    found = re.findall(r"^Q:\s*(.*?)\s*$", text, re.M)
    return found[-1] if found else None


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sqlite_grammar(tables: Mapping[str, Sequence[str]]) -> str:
    """Lark text admitting SQLite SELECTs over `tables` ({table: [columns]}), names quoted."""
    if not tables:
        raise ConstraintError("sql", 'the SQL constraint needs "tables": {name: [columns]}')
    _check_names("table", list(tables))
    for columns in tables.values():
        _check_names("column", list(columns))
    # A column as `"table"."column"` or a bare `"column"`. A query over one table may name only
    # that table's columns (SQLite refuses `"concert"."year"` in `... FROM "singer"`), so each
    # table has its own copy of the rules below; a join may name the columns of every table.
    scopes = (
        {"": dict(tables)}
        if len(tables) == 1
        else {
            "": dict(tables),
            **{f"_{i}": {t: tables[t]} for i, t in enumerate(tables)},
        }
    )
    rules = ['start: " "? query ";"?']
    if len(scopes) == 1:
        rules.append(
            'query: "SELECT " distinct? items " FROM " source join* where? group? order? limit?'
        )
    else:
        single = [f"query{s}" for s in scopes if s]
        rules.append(f"query: {' | '.join(single)} | query_join")
        rules.append(
            'query_join: "SELECT " distinct? items " FROM " source join+ where? group? order? limit?'
        )
        for s, scope in scopes.items():
            if s:
                [name] = scope
                rules.append(
                    f'query{s}: "SELECT " distinct? items{s} " FROM " {_alternatives([_quoted(name)])}'
                    f' (" AS " ALIAS)? where{s}? group{s}? order{s}? limit?'
                )
    for s, scope in scopes.items():
        qualified = [f"{_quoted(t)}.{_quoted(c)}" for t, cs in scope.items() for c in cs]
        bare = [_quoted(c) for cs in scope.values() for c in cs]
        rules += [
            f'items{s}: "*" | item{s} (", " item{s})*',
            f'item{s}: operand{s} (" AS " ALIAS)?',
            f'where{s}: " WHERE " condition{s}',
            f'condition{s}: comparison{s} ((" AND " | " OR ") comparison{s})*',
            # Aggregates in HAVING only: SQLite refuses them in WHERE.
            f'comparison{s}: column{s} " " OP " " (literal | column{s})'
            f' | column{s} " IS " "NOT "? "NULL" | column{s} " LIKE " STRING'
            f' | column{s} " IN (" literal (", " literal)* ")"',
            f'group{s}: " GROUP BY " column{s} (", " column{s})*'
            f' (" HAVING " aggregate{s} " " OP " " literal)?',
            f'order{s}: " ORDER BY " operand{s} (" ASC" | " DESC")?'
            f' (", " operand{s} (" ASC" | " DESC")?)*',
            f"operand{s}: column{s} | aggregate{s}",
            f'aggregate{s}: "COUNT(*)" | AGG "(" "DISTINCT "? column{s} ")"',
            f"column{s}: {_alternatives(qualified + bare)}",
        ]
    return "\n".join(
        [
            *rules,
            'distinct: "DISTINCT "',
            'source: table (" AS " ALIAS)?',
            'join: (" JOIN " | " LEFT JOIN ") source " ON " column " = " column',
            'limit: " LIMIT " INT',
            "literal: STRING | NUMBER",
            f"table: {_alternatives([_quoted(t) for t in tables])}",
            'AGG: "COUNT" | "SUM" | "AVG" | "MIN" | "MAX"',
            'OP: "=" | "!=" | "<>" | ">=" | "<=" | ">" | "<"',
            "ALIAS: /[a-z][a-z0-9_]{0,15}/",
            "STRING: /'([^'\\n]|''){0,40}'/",  # bounded: a runaway value cannot fill max_tokens
            f"NUMBER: {_NUMBER}",
            "INT: /[1-9][0-9]{0,5}/",
        ]
    )
