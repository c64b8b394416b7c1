"""WikiSQL's own training examples for the demo build, rewritten so every value is copied.

WikiSQL's gold values are often spelled otherwise than in the question ('SOUTH AUSTRALIA' for
"South Australia"); execution scoring folds case, but a model taught such pairs learns to
re-case values instead of copying them. Each string value that occurs in the question up to case
is replaced by the question's own spelling; the rest is kept. Only a train split goes in: valid
and test stay unseen, for measuring.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_core.eval.wikisql import (
    Condition,
    Query,
    SqlParseError,
    parse_example,
    parse_query,
    to_wikisql,
)


def copy_values(text: str) -> str:
    """`text` (a WikiSQL-format example) with each string value spelled as the question has it."""
    example = parse_example(text)
    if example.answer is None:
        return text
    try:
        query = parse_query(example.answer, example.columns, example.table)
    except SqlParseError:
        return text
    folded = example.question.casefold()
    conditions = []
    for c in query.conditions:
        value = c.value
        if isinstance(value, str) and len(value.casefold()) == len(value):
            at = folded.find(value.casefold())
            if at >= 0:
                value = example.question[at : at + len(value)]
        conditions.append(Condition(c.column, c.op, value))
    sql = to_wikisql(Query(query.table, query.select, query.agg, tuple(conditions)))
    return f"{text[: text.index(chr(10) + 'A:')]}\nA: {sql}"


def wikisql_train(path: Path, copies: int) -> list[str]:
    """The examples of a WikiSQL-format JSONL file, values copied, repeated `copies` times."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return [copy_values(t) for t in texts] * copies
