"""WikiSQL notation -> SQLite, and judging predictions, checked on the shared WikiSQL files."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_core.eval.sql_scoring import execution_match, score_predictions
from mlx_core.eval.wikisql import (
    Condition,
    ExampleFormatError,
    Query,
    SqlParseError,
    exact_match,
    parse_example,
    parse_query,
    prompt_of,
    to_sqlite,
    to_wikisql,
)

WIKISQL = Path("/work/shared/data/wikisql")
ROSTER = (
    "table: 1-10015132-16\n"
    "columns: Player, No., Nationality, Position, Years in Toronto, School/Club Team\n"
    "Q: What is terrence ross' nationality\n"
    "A: SELECT Nationality FROM 1-10015132-16 WHERE Player = 'Terrence Ross'"
)
COLUMNS = ("Player", "No.", "Nationality", "Position", "Years in Toronto", "Year", "Count")


def wikisql_lines() -> list[str]:
    lines = []
    for split in ("train", "valid", "test"):
        with open(WIKISQL / f"{split}.jsonl") as f:
            lines += [json.loads(line)["text"] for line in f]
    return lines


@pytest.fixture(scope="module")
def wikisql() -> list[str]:
    lines = wikisql_lines()
    assert len(lines) == 1200
    return lines


# --- examples -----------------------------------------------------------------------------------


def test_parse_example_splits_table_columns_question_and_answer() -> None:
    example = parse_example(ROSTER)
    assert example.table == "1-10015132-16"
    assert example.columns[:2] == ("Player", "No.")
    assert example.columns[-1] == "School/Club Team"
    assert example.question == "What is terrence ross' nationality"
    assert example.answer == "SELECT Nationality FROM 1-10015132-16 WHERE Player = 'Terrence Ross'"


def test_prompt_is_everything_up_to_a_colon_and_has_no_answer() -> None:
    prompt = prompt_of(ROSTER)
    assert prompt.endswith("Q: What is terrence ross' nationality\nA:")
    assert ROSTER == prompt + " " + parse_example(ROSTER).answer
    assert parse_example(prompt).answer is None


def test_malformed_example_says_what_format_is_expected() -> None:
    with pytest.raises(ExampleFormatError, match="columns: <a>, <b>"):
        parse_example("SELECT Player FROM t")
    with pytest.raises(ExampleFormatError, match="'Q:'"):
        prompt_of("table: t\ncolumns: a")


# --- parsing ------------------------------------------------------------------------------------


def test_column_names_with_spaces_are_matched_longest_first() -> None:
    query = parse_query(
        "SELECT MAX Years in Toronto FROM t WHERE Year = 1999 AND No. > '3'", COLUMNS
    )
    assert query == Query(
        table="t",
        select="Years in Toronto",
        agg="MAX",
        conditions=(Condition("Year", "=", 1999.0), Condition("No.", ">", "3")),
    )


def test_keyword_case_whitespace_and_trailing_semicolon_are_tolerated() -> None:
    loose = parse_query("  select count  player from t where  nationality='Canada' ;  ", COLUMNS)
    assert loose == parse_query("SELECT COUNT Player FROM t WHERE Nationality = 'Canada'", COLUMNS)
    assert loose.select == "Player"  # canonical spelling from the columns line
    assert parse_query("SELECT COUNT(Player) FROM t", COLUMNS).agg == "COUNT"


def test_a_column_named_like_an_aggregate_is_still_a_column() -> None:
    assert parse_query("SELECT Count FROM t", COLUMNS) == Query("t", "Count", None, ())
    assert parse_query("SELECT COUNT Count FROM t", COLUMNS).agg == "COUNT"


def test_unescaped_quotes_and_and_inside_values() -> None:
    query = parse_query(
        "SELECT No. FROM t WHERE Player = 'Patrick O'Bryant' AND Position = 'Guard and Forward'",
        COLUMNS,
    )
    assert [c.value for c in query.conditions] == ["Patrick O'Bryant", "Guard and Forward"]
    escaped = parse_query("SELECT No. FROM t WHERE Player = 'Patrick O''Bryant'", COLUMNS)
    assert escaped.conditions[0].value == "Patrick O'Bryant"


def test_comma_split_column_names_are_recovered() -> None:
    # The columns line joins names with ", ", so "Power, continuous" arrives as two entries.
    columns = ("Engine", "Power", "continuous", "Power", "takeoff")
    query = parse_query("SELECT COUNT Power, takeoff FROM t WHERE Power, continuous = '1'", columns)
    assert query.select == "Power, takeoff"
    assert query.conditions[0].column == "Power, continuous"


def test_table_must_be_the_examples_table_when_given() -> None:
    assert parse_query("SELECT Player FROM 1-2-3", COLUMNS, table="1-2-3").table == "1-2-3"
    with pytest.raises(SqlParseError, match="table 1-2-3"):
        parse_query("SELECT Player FROM 1-2-30", COLUMNS, table="1-2-3")


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("Player FROM t", "start with SELECT"),
        ("SELECT Playr FROM t", "column name from: Player, No."),
        ("SELECT Player t", "FROM <table>"),
        ("SELECT Player FROM t WHERE No. >= 3", r"operator \(=, > or <\)"),
        ("SELECT Player FROM t WHERE Nationality = Canada", "single quotes"),
        ("SELECT Player FROM t WHERE No. = 3 OR No. = 4", "AND <column>"),
        ("SELECT Player FROM t WHERE No. = 'Ann", "closing single quote"),
    ],
)
def test_parse_errors_say_what_was_expected(sql: str, hint: str) -> None:
    with pytest.raises(SqlParseError, match=hint):
        parse_query(sql, COLUMNS)


# --- translation --------------------------------------------------------------------------------


def test_to_sqlite_quotes_identifiers_and_escapes_values() -> None:
    columns = ("No.", "School/Club Team", "Player")
    query = parse_query("SELECT COUNT School/Club Team FROM 1-10015132-16 WHERE No. = '3'", columns)
    assert to_sqlite(query) == (
        'SELECT COUNT("School/Club Team") FROM "1-10015132-16" WHERE "No." = \'3\''
    )
    query = parse_query("SELECT No. FROM t WHERE Player = 'Ann O'Neil' AND No. < 4.5", columns)
    assert (
        to_sqlite(query)
        == 'SELECT "No." FROM "t" WHERE "Player" = \'Ann O\'\'Neil\' AND "No." < 4.5'
    )


def test_to_wikisql_is_the_inverse_of_parse_query() -> None:
    sql = "SELECT AVG Years in Toronto FROM t WHERE Player = 'Ann O'Neil' AND Year > 2001"
    assert to_wikisql(parse_query(sql, COLUMNS)) == sql


def test_every_wikisql_answer_parses_and_runs_in_sqlite(wikisql: list[str]) -> None:
    for text in wikisql:
        example = parse_example(text)
        query = parse_query(example.answer, example.columns, example.table)
        assert parse_query(to_wikisql(query), example.columns) == query  # nothing lost
        columns = {c.lower(): c for c in [*example.columns, query.select]}
        columns |= {c.column.lower(): c.column for c in query.conditions}
        schema = ", ".join('"' + c.replace('"', '""') + '"' for c in columns.values())
        db = sqlite3.connect(":memory:")
        db.execute(f'CREATE TABLE "{example.table}" ({schema})')
        db.execute(to_sqlite(query)).fetchall()
        db.close()


def test_gold_matches_itself_on_every_wikisql_example(wikisql: list[str]) -> None:
    for text in wikisql:
        example = parse_example(text)
        assert execution_match(example, example.answer, example.answer), text


# --- execution match ----------------------------------------------------------------------------


def mutations(query: Query, columns: tuple[str, ...]) -> dict[str, Query]:
    """Predictions that are wrong in one obvious way; each must be judged False."""
    found: dict[str, Query] = {}
    others = [c for c in columns if c.lower() != query.select.lower()]
    if query.agg != "COUNT" and others:  # COUNT of any column counts the same rows
        found["other column"] = replace(query, select=others[0])
    if query.conditions:
        first, *rest = query.conditions
        value = first.value
        if isinstance(value, float):
            other: str | float = value + 1
        elif value.strip().isdigit():
            other = str(int(value) + 1)
        else:
            other = value + " Junior"
        found["other value"] = replace(query, conditions=(replace(first, value=other), *rest))
        found["missing condition"] = replace(query, conditions=query.conditions[:-1])
        flipped = {"=": ">", ">": "<", "<": ">"}[first.op]
        found["other operator"] = replace(query, conditions=(replace(first, op=flipped), *rest))
        used = {c.column.lower() for c in query.conditions}
        free = [c for c in columns if c.lower() not in used]
        if free:
            moved = replace(first, column=free[0])
            found["condition on other column"] = replace(query, conditions=(moved, *rest))
            extra = Condition(free[-1], "=", "Zed")
            found["extra condition"] = replace(query, conditions=(*query.conditions, extra))
    fixed = any(c.column == query.select and c.op == "=" for c in query.conditions)
    other_agg = {None: "COUNT", "COUNT": None, "MAX": "MIN", "MIN": "MAX", "SUM": "AVG"}
    agg = other_agg.get(query.agg)
    if fixed and query.agg in ("MAX", "MIN"):  # MAX and MIN of one fixed value agree
        agg = None
    found["other aggregate"] = replace(query, agg=agg)
    return found


@pytest.mark.slow
def test_obviously_wrong_predictions_are_judged_false(wikisql: list[str]) -> None:
    judged = 0
    for text in wikisql:
        example = parse_example(text)
        gold = parse_query(example.answer, example.columns, example.table)
        for kind, wrong in mutations(gold, example.columns).items():
            predicted = to_wikisql(wrong)
            assert not execution_match(example, predicted, example.answer), (kind, text)
            judged += 1
    assert judged > 7500


def test_equivalent_predictions_are_judged_true() -> None:
    example = parse_example(
        "table: 1-2-3\ncolumns: Player, No., Nationality, Year\nQ: ?\n"
        "A: SELECT Player FROM 1-2-3 WHERE Nationality = 'Canada' AND No. = '3' AND Year > 2001"
    )
    for predicted in [
        "select player from 1-2-3 where year > 2001 and no. = 3 and nationality = 'CANADA';",
        "SELECT Player FROM 1-2-3 WHERE No. = 3.0 AND Nationality = 'canada' AND Year > 2001",
    ]:
        assert execution_match(example, predicted, example.answer), predicted
    # Case is ignored beyond ASCII too, as WikiSQL's evaluation lower-cases values.
    example = parse_example(
        "table: 1-2-3\ncolumns: Location, Report\nQ: ?\n"
        "A: SELECT Report FROM 1-2-3 WHERE Location = 'Österreichring'"
    )
    for predicted in ["SELECT Report FROM 1-2-3 WHERE Location = 'österreichring'"]:
        assert execution_match(example, predicted, example.answer), predicted


def test_off_by_one_boundaries_and_wrong_operators_are_caught() -> None:
    example = parse_example(
        "table: 1-2-3\ncolumns: Player, Year\nQ: ?\n"
        "A: SELECT COUNT Player FROM 1-2-3 WHERE Year > 2001"
    )
    for predicted in [
        "SELECT COUNT Player FROM 1-2-3 WHERE Year > 2000",
        "SELECT COUNT Player FROM 1-2-3 WHERE Year > 2002",
        "SELECT COUNT Player FROM 1-2-3 WHERE Year < 2001",
        "SELECT COUNT Player FROM 1-2-3 WHERE Year = 2001",
    ]:
        for seed in range(5):
            assert not execution_match(example, predicted, example.answer, seed=seed), predicted


def test_bad_predictions_are_false_and_bad_gold_raises() -> None:
    example = parse_example(ROSTER)
    for predicted in ["", "I don't know", "SELECT Height FROM 1-10015132-16", "SELECT Player"]:
        assert not execution_match(example, predicted, example.answer)
    huge = "SELECT Player FROM 1-10015132-16 WHERE No. > " + "9" * 400
    assert not execution_match(example, huge, example.answer)
    # A model that never stops: hundreds of conditions, quotes everywhere.
    rambling = "SELECT No. FROM 1-10015132-16 WHERE Player = '" + "a' AND Player = 'b" * 300
    assert not execution_match(example, rambling + "'", example.answer)
    with pytest.raises(SqlParseError):
        execution_match(example, example.answer, "SELECT Height FROM 1-10015132-16")


# --- exact match and scoring --------------------------------------------------------------------


def test_exact_match_normalizes_keywords_and_whitespace_but_not_values() -> None:
    gold = "SELECT COUNT No. FROM t WHERE Player = 'Grey and  Bell' AND No. > 3"
    assert exact_match(
        "select count  No. from t where Player = 'Grey and  Bell' and No. > 3;", gold
    )
    assert not exact_match(
        "SELECT COUNT No. FROM t WHERE Player = 'Grey and Bell' AND No. > 3", gold
    )
    assert not exact_match(
        "SELECT COUNT No. FROM t WHERE Player = 'grey and  bell' AND No. > 3", gold
    )
    assert not exact_match(
        "SELECT COUNT No. FROM t WHERE No. > 3 AND Player = 'Grey and  Bell'", gold
    )
    assert exact_match(
        "SELECT No. FROM t WHERE Player = 'Patrick O'Bryant'",
        "select No. FROM t WHERE Player = 'Patrick O'Bryant'",
    )


def test_score_predictions_reports_fractions(wikisql: list[str]) -> None:
    examples = wikisql[:4]
    gold = [parse_example(t).answer for t in examples]
    assert score_predictions(examples, gold).exact == 1.0
    reordered = "select " + gold[0][len("SELECT ") :] + ";"
    scores = score_predictions(examples, [reordered, gold[1], "SELECT nonsense", ""])
    assert (scores.n, scores.exact, scores.execution) == (4, 0.5, 0.5)
    with pytest.raises(ValueError, match="one prediction per example"):
        score_predictions(examples, gold[:2])
    with pytest.raises(ExampleFormatError, match="no answer"):
        score_predictions([prompt_of(examples[0])], ["SELECT x"])
