"""Schema-grounded SQL: the grammars admit every gold answer and nothing outside the schema.

Noise logits through the mask (as in test_structured.py) must still give SQL that parses over
exactly the request's table and columns, and runs in SQLite after `to_sqlite`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
import sqlglot

from mlx_core.demo.schema_corpus import generate_examples
from mlx_core.eval.wikisql import parse_example, parse_query, sqlite_identifier, to_sqlite
from mlx_core.structured import ConstraintError, RowMatcher, lark_grammar
from mlx_core.structured.sql import (
    question_from_prompt,
    question_spans,
    schema_from_prompt,
    sqlite_grammar,
    wikisql_grammar,
)
from mlx_core.tokenizer import Tokenizer
from tests.engine.test_structured import generate

WIKISQL = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikisql" / "test.jsonl"
if not WIKISQL.exists():  # a checkout outside the workspace: the shared copy, as other tests do
    WIKISQL = Path("/work/shared/data/wikisql/test.jsonl")
PROMPT = (
    "table: 1-10015132-16\n"
    "columns: Player, No., Nationality, Position, Years in Toronto, School/Club Team\n"
    "Q: How many players have position of Guard?\nA:"
)


def _accepts(grammar: str, text: str, tokenizer: Tokenizer, vocab) -> bool:
    # The answer as the model writes it after "A:" (no sentencepiece dummy prefix of its own).
    head = tokenizer.encode("A:", add_bos=False)
    ids = tokenizer.encode("A:" + text, add_bos=False)
    assert ids[: len(head)] == head
    matcher = RowMatcher(lark_grammar(grammar), vocab)
    return all(matcher.advance(t) for t in ids[len(head) :]) and matcher.is_accepting()


def _wikisql_examples(n: int):
    lines = WIKISQL.read_text().splitlines()[:n]
    return [parse_example(json.loads(line)["text"]) for line in lines]


def test_schema_comes_from_the_prompt():
    schema = schema_from_prompt(PROMPT)
    assert schema.table == "1-10015132-16"
    assert schema.columns[-1] == "School/Club Team" and len(schema.columns) == 6
    assert question_from_prompt(PROMPT) == "How many players have position of Guard?"
    with pytest.raises(ConstraintError, match="table: <name>"):
        schema_from_prompt("Q: what?\nA:")


def test_every_gold_wikisql_answer_is_admitted(tokenizer, vocab):
    examples = _wikisql_examples(60)
    checked = 0
    for ex in examples:
        grammar = wikisql_grammar(ex.table, ex.columns)
        assert ex.answer is not None
        if parse_query(ex.answer, ex.columns, ex.table).select not in ex.columns:
            continue  # a header name holding ", " ("Tone (...: /~/ - level, /^/ - broken)")
        if re.search(r"' (?!AND )", ex.answer.partition(" WHERE ")[2]):
            continue  # a quote inside a value before a space ('"Poppin' Tags"'): it reads as the end
        checked += 1
        assert _accepts(grammar, " " + ex.answer, tokenizer, vocab), ex.answer
    assert checked >= 55


def test_a_column_whose_name_begins_another_is_reachable(tokenizer, vocab):
    # "Winner" is a prefix of "Winner 1413": the lexer must not commit to the longer name
    grammar = wikisql_grammar("t9", ["Quartet", "Winner", "Winner 1413", "No.", "No. in series"])
    for sql in (
        " SELECT Quartet FROM t9 WHERE Winner = 'Sven'",
        " SELECT Quartet FROM t9 WHERE Winner 1413 = 'Sven'",
        " SELECT Winner FROM t9 WHERE No. > 3 AND No. in series = '4'",
        " SELECT COUNT Winner 1413 FROM t9",
        " SELECT No. FROM t9 WHERE Quartet = 'O'Brien Hall'",
    ):
        assert _accepts(grammar, sql, tokenizer, vocab), sql
    assert not _accepts(grammar, " SELECT Winner 14 FROM t9", tokenizer, vocab)


def test_values_from_the_question_keep_their_inner_punctuation():
    spans = set(
        question_spans("When did E. Dybais win on May 7, 1995, with Anneck's O'Brien Jr..?")
    )
    for value in ("E. Dybais", "May 7, 1995", "Anneck", "Anneck's O'Brien", "O'Brien Jr."):
        assert value in spans, value
    assert "1995," not in spans and "Jr..?" not in spans


def test_every_generated_gold_value_is_a_span_of_its_question(tokenizer, vocab):
    # the generator's values are copied from the question, dates and initials included
    for text in generate_examples(40, seed=11, part="vocabulary"):
        ex = parse_example(text)
        assert ex.answer is not None
        grammar = wikisql_grammar(ex.table, ex.columns, values_from=ex.question)
        assert _accepts(grammar, " " + ex.answer, tokenizer, vocab), text


def test_other_columns_tables_and_shapes_are_refused(tokenizer, vocab):
    grammar = wikisql_grammar("1-10015132-16", schema_from_prompt(PROMPT).columns)
    assert _accepts(grammar, " SELECT COUNT Player FROM 1-10015132-16", tokenizer, vocab)
    assert not _accepts(grammar, " SELECT COUNT Opponent FROM 1-10015132-16", tokenizer, vocab)
    assert not _accepts(grammar, " SELECT Player FROM 2-10015132-16", tokenizer, vocab)
    assert not _accepts(grammar, " SELECT Player FROM 1-10015132-16 WHERE", tokenizer, vocab)


def test_noise_through_the_wikisql_mask_is_sql_over_the_schema(vocab, masks):
    schema = schema_from_prompt(PROMPT)
    grammar = lark_grammar(wikisql_grammar(schema.table, schema.columns))
    rows = [RowMatcher(grammar, vocab) for _ in range(32)]
    out = generate(rows, vocab, masks, seed=3, max_tokens=200)
    finished = [text.decode() for text, finish in out if finish == "stop"]
    assert len(finished) >= 16  # noise rarely ends early, but the grammar ends it at its last rule
    db = sqlite3.connect(":memory:")
    columns = ", ".join(f"{sqlite_identifier(c)} TEXT" for c in schema.columns)
    db.execute(f"CREATE TABLE {sqlite_identifier(schema.table)} ({columns})")
    for sql in finished:
        query = parse_query(sql, schema.columns, schema.table)  # raises if it is not
        db.execute(to_sqlite(query)).fetchall()


def test_values_can_be_held_to_spans_of_the_question(vocab, masks):
    question = "who played for the Toronto Raptors in 1995"
    grammar = lark_grammar(wikisql_grammar("t1", ["Player", "Team"], values_from=question))
    rows = [RowMatcher(grammar, vocab) for _ in range(24)]
    for text, finish in generate(rows, vocab, masks, seed=5, max_tokens=60):
        if finish != "stop" or "WHERE" not in text.decode():
            continue
        for cond in parse_query(text.decode(), ["Player", "Team"], "t1").conditions:
            assert isinstance(cond.value, float) or cond.value in question


def test_noise_through_the_sqlite_mask_is_sql_sqlite_runs(vocab, masks):
    tables = {"singer": ["singer id", "name", "age"], "concert": ["singer id", "year"]}
    grammar = lark_grammar(sqlite_grammar(tables))
    db = sqlite3.connect(":memory:")
    for table, columns in tables.items():
        names = ", ".join(f'"{c}"' for c in columns)
        db.execute(f'CREATE TABLE "{table}" ({names})')
    rows = [RowMatcher(grammar, vocab) for _ in range(32)]
    ran = 0
    for text, finish in generate(rows, vocab, masks, seed=7, max_tokens=120):
        if finish != "stop":
            continue
        sql = text.decode()
        sqlglot.parse_one(sql, read="sqlite")
        try:
            db.execute(sql).fetchall()
        except sqlite3.OperationalError as e:  # grammatical but meaningless, e.g. ambiguous names
            assert "ambiguous" in str(e) or "no such column" in str(e), (sql, e)
            continue
        ran += 1
    assert ran >= 8


def test_bad_schemas_are_refused():
    with pytest.raises(ConstraintError, match="at least one column"):
        wikisql_grammar("t", [])
    with pytest.raises(ConstraintError, match="non-empty"):
        sqlite_grammar({"t": ["a", " "]})
