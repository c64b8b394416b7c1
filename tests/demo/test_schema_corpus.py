"""The schema-reading corpus: its SQL runs, values are copied, held-out parts stay held out."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pytest

from mlx_core.demo.columns import TYPED, MadeUp, Vocabulary, show
from mlx_core.demo.phrasings import HELD_OUT, TRAIN
from mlx_core.demo.schema_corpus import HELD_OUT_FRACTION, PARTS, generate_examples, write_dataset
from mlx_core.demo.wikisql_mix import copy_values
from mlx_core.demo.words import CONNECTORS, UNITS
from mlx_core.eval.sql_scoring import execution_match
from mlx_core.eval.wikisql import parse_example, parse_query, prompt_of

N = 2000


@pytest.fixture(scope="module", params=list(PARTS))
def part(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    return request.param, generate_examples(N, seed=0, part=request.param)


def test_every_example_parses_runs_and_copies_its_values(part: tuple[str, list[str]]) -> None:
    _, corpus = part
    assert len(corpus) == N
    for text in corpus:
        example = parse_example(text)
        assert example.answer is not None
        assert text == f"{prompt_of(text)} {example.answer}"
        query = parse_query(example.answer, example.columns, example.table)
        assert query.select in example.columns
        for cond in query.conditions:
            assert show(cond.value) in example.question, text  # verbatim, case and all
        assert execution_match(example, example.answer, example.answer), text


def test_tables_columns_and_questions_vary(part: tuple[str, list[str]]) -> None:
    _, corpus = part
    examples = [parse_example(t) for t in corpus]
    widths = Counter(len(e.columns) for e in examples)
    assert set(widths) == set(range(3, 11)), widths
    names = {c for e in examples for c in e.columns}
    assert len(names) > 0.5 * sum(widths.values()) / 4  # columns hardly repeat
    for mark in ("/", "(", "#", "%", "No."):
        assert any(mark in n for n in names), mark
    assert any(e.table.startswith(("1-", "2-")) for e in examples)
    assert any(not e.table[0].isdigit() for e in examples)
    questions = [e.question for e in examples]
    assert len(set(questions)) > 0.97 * N
    assert 0.2 * N < sum(q.endswith("?") for q in questions) < 0.8 * N
    assert sum(q[0].islower() for q in questions) > 0.2 * N


def test_query_kinds_all_show_up(part: tuple[str, list[str]]) -> None:
    name, corpus = part
    seen: Counter[str] = Counter()
    for text in corpus:
        e = parse_example(text)
        assert e.answer is not None
        q = parse_query(e.answer, e.columns, e.table)
        seen[q.agg or "plain"] += 1
        seen[f"{len(q.conditions)} conditions"] += 1
        seen.update(c.op for c in q.conditions)
    for kind in ("plain", "COUNT", "MAX", "MIN", "SUM", "AVG", "=", ">", "<", "2 conditions"):
        assert seen[kind] > 0.03 * N, (name, kind, seen)


def test_held_out_words_never_reach_the_training_part() -> None:
    train, held = (Vocabulary.part(h, HELD_OUT_FRACTION, MadeUp()) for h in (False, True))
    assert not set(train.words) & set(held.words)
    assert 0.05 < len(held.words) / (len(train.words) + len(held.words)) < 0.2

    def words(texts: Iterable[str]) -> set[str]:
        return {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}

    # words only held-out entries have, less what any table may have: decorations ("of",
    # "No.") and the names of typed columns ("Date", "Venue")
    shared = [*CONNECTORS, *UNITS, "no", *(n for names in TYPED.values() for n in names)]
    held_words = words(held.words) - words(train.words) - words(shared)
    train_names = {
        c.lower() for t in generate_examples(N, seed=0) for c in parse_example(t).columns
    }
    for name in train_names:
        assert not held_words & words([name]), name


def test_made_up_share_changes_the_training_tables_alone() -> None:
    more = MadeUp(column_word=0.6, name_part=0.6)
    for part in ("vocabulary", "phrasing", "french"):  # the measured sets do not move
        assert generate_examples(100, 3, part, more) == generate_examples(100, 3, part)
    listed = {
        w
        for entry in Vocabulary.part(False, HELD_OUT_FRACTION, MadeUp()).words
        for w in re.split(r"[ /]", entry)
    }

    def unlisted_share(texts: list[str]) -> float:
        words = [
            w
            for t in texts
            for c in parse_example(t).columns
            for w in re.findall(r"[a-z]+", c.lower())
            if len(w) > 2
        ]
        return sum(w not in listed for w in words) / len(words)

    default, made_up = (unlisted_share(generate_examples(N, 3, "train", m)) for m in (None, more))
    assert made_up > default + 0.2, (default, made_up)


def test_held_out_phrasings_are_not_training_phrasings() -> None:
    assert not set(HELD_OUT.select) & set(TRAIN.select)
    assert not set(HELD_OUT.count) & set(TRAIN.count)
    assert not set(HELD_OUT.aggregate) & set(TRAIN.aggregate)


def test_same_seed_same_corpus_other_seed_other_corpus() -> None:
    assert generate_examples(200, seed=3) == generate_examples(200, seed=3)
    assert generate_examples(200, seed=3) != generate_examples(200, seed=4)
    assert generate_examples(50, seed=3) == generate_examples(200, seed=3)[:50]
    with pytest.raises(ValueError, match="choose from: train"):
        generate_examples(10, seed=1, part="mountains")


def test_write_dataset_keeps_tables_apart(tmp_path: Path) -> None:
    write_dataset(tmp_path, 300, 50, 50, seed=5, part="french", chat_fraction=0.25)
    tables: dict[str, set[str]] = {}
    for split, n in (("train", 300), ("valid", 50), ("test", 50)):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        assert 0.1 * n < sum("messages" in r for r in rows) < 0.45 * n
        texts = [r["text"] if "text" in r else r["messages"][0]["content"] for r in rows]
        tables[split] = {parse_example(t).table for t in texts}
    assert not tables["train"] & tables["valid"]
    assert not tables["train"] & tables["test"]
    assert not tables["valid"] & tables["test"]


def test_wikisql_values_are_respelled_as_the_question_writes_them() -> None:
    text = (
        "table: 1-1000181-1\ncolumns: State/territory, Current slogan, Notes\n"
        "Q: Tell me what the notes are for South Australia \n"
        "A: SELECT Notes FROM 1-1000181-1 WHERE Current slogan = 'SOUTH AUSTRALIA'"
    )
    assert copy_values(text).endswith("WHERE Current slogan = 'South Australia'")
    unchanged = text.replace("for South Australia", "for the south")
    assert copy_values(unchanged) == unchanged


def test_a_column_goes_unsaid_only_when_its_name_says_the_value_kind() -> None:
    """ "how many border brindgea for Phoenix" -> WHERE Hometown = 'Phoenix', as WikiSQL asks."""
    unsaid = 0
    for text in generate_examples(N, seed=0):
        e = parse_example(text)
        assert e.answer is not None
        q = parse_query(e.answer, e.columns, e.table)
        if len(q.conditions) != 1:
            continue
        column = q.conditions[0].column.lower()
        if not any(part in e.question.lower() for part in column.replace("/", " ").split()):
            unsaid += 1
            assert any(column == n for names in TYPED.values() for n in names), text
    assert unsaid > 0.03 * N
