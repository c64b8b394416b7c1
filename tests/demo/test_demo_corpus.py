"""The demo text-to-SQL corpus: its SQL runs, its questions carry the values, splits are clean."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from mlx_core.demo.corpus import (
    DOMAINS,
    generate_chat_examples,
    generate_examples,
    show,
    write_dataset,
)
from mlx_core.demo.domains import DOMAINS_DATA, NUMERIC_KINDS, YEAR
from mlx_core.eval.sql_scoring import execution_match
from mlx_core.eval.wikisql import parse_example, parse_query, prompt_of

N = 3000
TABLE_ID = re.compile(r"1-\d{5,8}-\d{1,2}")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_examples(N, seed=0)


def domain_of(columns: tuple[str, ...]) -> str:
    """The one domain whose columns include all of these (tables take a subset of a domain)."""
    found = [d.name for d in DOMAINS_DATA if set(columns) <= {c.name for c in d.columns}]
    assert len(found) == 1, (columns, found)
    return found[0]


@pytest.mark.slow
def test_every_example_parses_and_its_sql_runs(corpus: list[str]) -> None:
    assert len(corpus) == N
    for text in corpus:
        example = parse_example(text)
        assert TABLE_ID.fullmatch(example.table), example.table
        assert text == f"{prompt_of(text)} {example.answer}"
        parse_query(example.answer, example.columns, example.table)
        assert execution_match(example, example.answer, example.answer), text


def test_values_in_the_sql_are_written_verbatim_in_the_question(corpus: list[str]) -> None:
    for text in corpus:
        example = parse_example(text)
        query = parse_query(example.answer, example.columns, example.table)
        for cond in query.conditions:
            assert show(cond.value) in example.question, text


def test_aggregates_and_comparisons_fit_the_column_kind(corpus: list[str]) -> None:
    seen: Counter[str] = Counter()
    for text in corpus:
        example = parse_example(text)
        query = parse_query(example.answer, example.columns, example.table)
        domain = next(d for d in DOMAINS_DATA if d.name == domain_of(example.columns))
        spec = {c.name: c for c in domain.columns}
        seen[query.agg or "plain"] += 1
        seen[f"{len(query.conditions)} conditions"] += 1
        if query.agg in ("MAX", "MIN"):
            assert spec[query.select].kind in NUMERIC_KINDS, text
        if query.agg in ("SUM", "AVG"):
            column = spec[query.select]
            assert column.kind in NUMERIC_KINDS and column.kind != YEAR and column.summable, text
        for cond in query.conditions:
            seen[cond.op] += 1
            numeric = spec[cond.column].kind in NUMERIC_KINDS
            assert isinstance(cond.value, float) == numeric, text  # numbers bare, text quoted
            if cond.op != "=":
                assert numeric, text
                assert cond.value >= 0, text  # thresholds read naturally: no "over -1"
    # Every kind of query shows up often enough to be learned.
    for kind in ("plain", "COUNT", "MAX", "MIN", "SUM", "AVG", "=", ">", "<"):
        assert seen[kind] > N * 0.03, (kind, seen)
    for n in (0, 1, 2, 3):
        assert seen[f"{n} conditions"] > N * 0.02, seen


def test_questions_are_varied(corpus: list[str]) -> None:
    questions = [parse_example(t).question for t in corpus]
    openings = Counter(" ".join(q.lower().split()[:2]) for q in questions)
    assert len(openings) >= 40, openings.most_common(10)
    # The commonest opening ("what is") is rarer than in WikiSQL's own questions (27%).
    assert openings.most_common(1)[0][1] < 0.25 * N
    assert len(set(questions)) > 0.95 * N


def test_domains_tables_and_column_names_look_like_wikisql(corpus: list[str]) -> None:
    assert len(DOMAINS) >= 12
    examples = [parse_example(t) for t in corpus]
    assert {domain_of(e.columns) for e in examples} == set(DOMAINS)
    names = {c for e in examples for c in e.columns}
    for odd in ("No.", "School/Club Team", "Years in Toronto", "Pop. (2010)"):
        assert odd in names
    tables = Counter(e.table for e in examples)
    assert 2 <= sum(tables.values()) / len(tables) <= 6  # a few questions per table, as WikiSQL


def test_same_seed_same_corpus_other_seed_other_corpus() -> None:
    assert generate_examples(200, seed=3) == generate_examples(200, seed=3)
    assert generate_examples(200, seed=3) != generate_examples(200, seed=4)
    assert generate_examples(50, seed=3) == generate_examples(200, seed=3)[:50]


def test_domain_selection_and_hold_out() -> None:
    films = generate_examples(300, seed=1, domains=["films"])
    assert {domain_of(parse_example(t).columns) for t in films} == {"films"}
    rest = generate_examples(600, seed=1, exclude_domains=["films", "cars"])
    held_out = {domain_of(parse_example(t).columns) for t in rest}
    assert held_out == set(DOMAINS) - {"films", "cars"}
    with pytest.raises(ValueError, match="choose from: players"):
        generate_examples(10, seed=1, domains=["football"])
    with pytest.raises(ValueError, match="keep at least one"):
        generate_examples(10, seed=1, domains=["films"], exclude_domains=["films"])


def test_chat_examples_split_prompt_and_sql() -> None:
    chats = generate_chat_examples(100, seed=2)
    texts = generate_examples(100, seed=2)
    for chat, text in zip(chats, texts, strict=True):
        user, assistant = chat["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"] + "\nA: " + assistant["content"] == text
        assert user["content"].startswith("table: ") and "\nQ: " in user["content"]
        assert assistant["content"].startswith("SELECT ")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_dataset_keeps_tables_apart_and_mixes_chats(tmp_path: Path) -> None:
    write_dataset(tmp_path, 400, 60, 60, seed=5, exclude_domains=["ships"], chat_fraction=0.25)
    tables: dict[str, set[str]] = {}
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        rows = read_jsonl(tmp_path / f"{split}.jsonl")
        assert len(rows) == n
        chats = [r for r in rows if "messages" in r]
        assert 0.1 * n < len(chats) < 0.45 * n
        texts = [r["text"] if "text" in r else r["messages"][0]["content"] for r in rows]
        tables[split] = {parse_example(t).table for t in texts}
        assert all(domain_of(parse_example(t).columns) != "ships" for t in texts)
    assert not tables["train"] & tables["valid"]
    assert not tables["train"] & tables["test"]
    assert not tables["valid"] & tables["test"]
    # The chat share draws from its own random stream: the examples themselves do not change.
    write_dataset(tmp_path / "plain", 400, 60, 60, seed=5, exclude_domains=["ships"])
    plain = read_jsonl(tmp_path / "plain" / "train.jsonl")
    mixed = read_jsonl(tmp_path / "train.jsonl")
    for p, m in zip(plain, mixed, strict=True):
        if "text" in m:
            assert m == p


def test_write_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        write_dataset(tmp_path, 10, 1, 1, seed=0, chat_fraction=1.5)
    with pytest.raises(ValueError, match="zero or more"):
        write_dataset(tmp_path, -1, 1, 1, seed=0)
