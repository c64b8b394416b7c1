"""A request's structured-output fields -> the engine's Constraint, checked before anything runs.

One constraint per request, from whichever field the client used: OpenAI's `response_format`
(json_object, json_schema), vLLM's `structured_outputs` (json, regex, choice, grammar,
json_object, and loraforge's own `sql`) or its `guided_*` aliases. Two at once, or one that does
not compile, is a 400 naming the field, e.g. `structured_outputs.regex`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from mlx_core.structured import Constraint, ConstraintError, compile_grammar
from mlx_core.structured.sql import (
    question_from_prompt,
    schema_from_prompt,
    sqlite_grammar,
    wikisql_grammar,
)
from server.errors import BadRequestError
from server.schemas.structured import SqlSchema, StructuredOutputFields


@dataclass(frozen=True)
class RequestedConstraint:
    """The request's constraint (None: free text) and the field it came from."""

    constraint: Constraint | None = None
    param: str | None = None

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Turn a ConstraintError raised inside (the engine building the row's matcher) into
        the 400 naming this request's field."""
        try:
            yield
        except ConstraintError as e:
            raise BadRequestError(str(e), param=self.param or "response_format") from None


def requested_constraint(
    req: StructuredOutputFields, prompt_text: str | None = None
) -> RequestedConstraint:
    """The one constraint `req` asks for, compiled once here so a bad spec is a 400 now.

    `prompt_text` (the prompt, or the last user message) is what `sql: "from_prompt"` reads.
    Raises BadRequestError naming the field when two are set or one cannot be used.
    """
    found = _constraints(req, prompt_text)
    if len(found) > 1:
        (first, _), (second, _) = found[:2]
        raise BadRequestError(
            f"`{first}` and `{second}` both constrain the output: send only one of them",
            param=second,
        )
    if not found:
        return RequestedConstraint()
    param, constraint = found[0]
    if req.structured_outputs is not None and req.structured_outputs.disable_any_whitespace:
        constraint = replace(constraint, compact=True)
    try:
        compile_grammar(constraint)  # cached: the engine's matcher reuses it
    except ConstraintError as e:
        raise BadRequestError(str(e), param=param) from None
    return RequestedConstraint(constraint, param)


def sql_constraint(spec: SqlSchema | str, prompt_text: str | None) -> Constraint:
    """The grammar constraint for a SQL spec; ConstraintError says what is wrong with it."""
    if isinstance(spec, str):  # "from_prompt"
        if prompt_text is None:
            raise ConstraintError(
                "sql",
                '"from_prompt" reads the table from the prompt: send one string prompt (or a '
                "chat whose last user message has the table), or the table itself",
            )
        schema = schema_from_prompt(prompt_text)
        return Constraint("grammar", wikisql_grammar(schema.table, schema.columns))
    if spec.dialect == "sqlite":
        if not spec.tables:
            raise ConstraintError("sql", 'dialect "sqlite" needs "tables": {name: [columns]}')
        return Constraint("grammar", sqlite_grammar(spec.tables))
    if spec.table is None or not spec.columns:
        raise ConstraintError(
            "sql", 'the WikiSQL dialect needs "table" and "columns" (or use "from_prompt")'
        )
    question = question_from_prompt(prompt_text) if prompt_text else None
    if spec.values == "from_question" and question is None:
        raise ConstraintError(
            "sql", '"values": "from_question" needs a "Q: ..." line in the prompt to copy from'
        )
    spans = question if spec.values == "from_question" else None
    return Constraint("grammar", wikisql_grammar(spec.table, spec.columns, spans))


def _constraints(
    req: StructuredOutputFields, prompt_text: str | None
) -> list[tuple[str, Constraint]]:
    found: list[tuple[str, Constraint]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", Constraint("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise BadRequestError(
                'response_format of type "json_schema" needs `json_schema.schema`: send '
                '{"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}',
                param="response_format.json_schema",
            )
        found.append(("response_format", Constraint("json", fmt.json_schema.schema_)))
    so = req.structured_outputs
    if so is not None:
        before = len(found)
        if so.json is not None:
            found.append(("structured_outputs.json", Constraint("json", so.json)))
        if so.regex is not None:
            found.append(("structured_outputs.regex", Constraint("regex", so.regex)))
        if so.choice is not None:
            found.append(("structured_outputs.choice", Constraint("choice", so.choice)))
        if so.grammar is not None:
            found.append(("structured_outputs.grammar", Constraint("grammar", so.grammar)))
        if so.json_object:
            found.append(("structured_outputs.json_object", Constraint("json_object")))
        if so.sql is not None:
            try:
                found.append(("structured_outputs.sql", sql_constraint(so.sql, prompt_text)))
            except ConstraintError as e:
                raise BadRequestError(str(e), param="structured_outputs.sql") from None
        if len(found) == before and not (so.disable_any_whitespace and found):
            raise BadRequestError(
                "structured_outputs sets no constraint: give one of json, regex, choice, "
                "grammar, json_object or sql (or leave structured_outputs out)",
                param="structured_outputs",
            )
    if req.guided_json is not None:
        found.append(("guided_json", Constraint("json", req.guided_json)))
    if req.guided_regex is not None:
        found.append(("guided_regex", Constraint("regex", req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", Constraint("choice", req.guided_choice)))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", Constraint("grammar", req.guided_grammar)))
    return found
