"""Text-to-SQL a RAG app can run: POST /v1/sql and the `structured_outputs.sql` constraint.

The embedded default model over tables it never saw: with the constraint every answer names only
the schema's columns, and the returned `sql` runs in SQLite as it is.
"""

from __future__ import annotations

import sqlite3

import httpx
import openai
import pytest

from mlx_core.eval.wikisql import parse_example, parse_query
from server.settings import Settings
from tests.serving import start_model_server

pytestmark = pytest.mark.timeout(300)

SCHEMAS = [
    ("1-10015132-16", ["Player", "No.", "Nationality", "Position", "School/Club Team"]),
    ("2-4411003-1", ["Season", "Team", "Wins", "Losses", "Coach"]),
    ("1-2679061-9", ["Pick #", "Player", "Position", "Nationality", "NHL team"]),
    ("2-18847692-2", ["Date", "Opponent", "Score", "Result", "Attendance"]),
]
QUESTIONS = [
    "How many players have position of Guard?",
    "Which team did coach Ana Ruiz lead?",
    "What position does Ryan Miller play?",
    "What was the score against Boston?",
]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), start_worker=False)
    with start_model_server(settings) as (base_url, _):
        yield base_url


def _runs_in_sqlite(sql: str, tables: dict[str, list[str]]) -> None:
    db = sqlite3.connect(":memory:")
    for table, columns in tables.items():
        names = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
        db.execute(f'CREATE TABLE "{table}" ({names})')
    db.execute(sql).fetchall()  # raises if SQLite cannot run it


def test_sql_endpoint_returns_sql_that_sqlite_runs(url):
    for (table, columns), question in zip(SCHEMAS, QUESTIONS, strict=True):
        body = {"model": "loraforge-demo", "question": question, "schema": {table: columns}}
        r = httpx.post(f"{url}/v1/sql", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["error"] is None and out["finish_reason"] == "stop"
        _runs_in_sqlite(out["sql"], {table: columns})
        # The model's own notation reads back over exactly this table.
        parse_query(out["wikisql"], columns, table)
        assert out["usage"]["completion_tokens"] > 0


def test_sql_endpoint_reads_a_prompt_style_schema_and_refuses_bad_ones(url):
    text = "table: 1-10015132-16\ncolumns: Player, No., Nationality, Position"
    r = httpx.post(
        f"{url}/v1/sql",
        json={"model": "loraforge-demo", "question": "Who is number 5?", "schema": text},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    _runs_in_sqlite(
        r.json()["sql"], {"1-10015132-16": ["Player", "No.", "Nationality", "Position"]}
    )
    bad = [
        ({"schema": {}}, "schema"),
        ({"schema": {"t": []}}, "schema"),
        ({"schema": "no table lines here"}, "schema"),
        ({"schema": {"a": ["x"], "b": ["y"]}, "dialect": "wikisql"}, "dialect"),
        ({"question": ""}, "question"),
    ]
    for change, param in bad:
        body = {"model": "loraforge-demo", "question": "q?", "schema": {"t": ["a"]}, **change}
        r = httpx.post(f"{url}/v1/sql", json=body, timeout=60)
        assert r.status_code == 400, (change, r.text)
        assert r.json()["error"]["param"] == param


def test_several_tables_give_quoted_sqlite(url):
    tables = {"singer": ["name", "age", "country"], "concert": ["year", "singer name"]}
    body = {
        "model": "loraforge-demo",
        "question": "how many singers are from France",
        "schema": tables,
    }
    out = httpx.post(f"{url}/v1/sql", json=body, timeout=120).json()
    assert out["wikisql"] is None
    _runs_in_sqlite(out["sql"], tables)


def test_the_sql_constraint_on_completions_and_chat(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for (table, columns), question in zip(SCHEMAS, QUESTIONS, strict=True):
        prompt = f"table: {table}\ncolumns: {', '.join(columns)}\nQ: {question}\nA:"
        ex = parse_example(prompt)
        for spec in ("from_prompt", {"table": table, "columns": columns}):
            r = client.completions.create(
                model="loraforge-demo",
                prompt=prompt,
                max_tokens=64,
                temperature=0.8,
                seed=1,
                extra_body={"structured_outputs": {"sql": spec}},
            )
            assert r.choices[0].finish_reason == "stop"
            parse_query(r.choices[0].text, ex.columns, ex.table)
        chat = client.chat.completions.create(
            model="loraforge-demo",
            messages=[{"role": "user", "content": prompt.removesuffix("\nA:")}],
            max_tokens=64,
            temperature=0,
            extra_body={"structured_outputs": {"sql": "from_prompt"}},
        )
        parse_query(chat.choices[0].message.content or "", ex.columns, ex.table)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model="loraforge-demo",
            prompt="no schema here\nA:",
            max_tokens=8,
            extra_body={"structured_outputs": {"sql": "from_prompt"}},
        )
    assert e.value.body["param"] == "structured_outputs.sql"
