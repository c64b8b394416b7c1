"""How good is a model (or a model plus adapter) on a data set: test loss and text-to-SQL metrics.

Two measurements, both on held-out examples:

- `test_loss`: mean cross-entropy per target token and its perplexity, tokenized exactly as
  training tokenizes (BOS, EOS, prompt mask), so it compares with the trainer's validation loss.
- `evaluate_sql`: greedy generation on ``table:/columns:/Q:/A:`` prompts, scored by exact match
  and by execution on synthesized SQLite tables (`mlx_core.eval.sql_scoring`). Generation runs with no stop
  sequence unless one is asked for, because whether the model *stops by itself* (emits EOS after
  the SQL) is one of the things being measured: `stop_rate`. Accuracy is reported on the text as
  generated and on its first line, so the cost of not stopping is visible.

Generation goes through the serving `Engine` (continuous batching), with an adapter made resident
in `AdapterSlots` exactly as `loraforge generate --adapter` and the server apply it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mlx_core.data.formats import (
    DataFormatError,
    Example,
    PromptCompletionExample,
    TextExample,
    find_split_files,
    read_jsonl,
)
from mlx_core.engine import Engine, EngineError, GenerationRequest
from mlx_core.errors import LoraforgeError
from mlx_core.eval.sql_scoring import execution_match
from mlx_core.eval.wikisql import (
    ExampleFormatError,
    SqlExample,
    SqlParseError,
    exact_match,
    parse_example,
    parse_query,
    prompt_of,
)
from mlx_core.lora.slots import AdapterSlots
from mlx_core.model import Mistral
from mlx_core.sampling import SamplingParams
from mlx_core.structured import Constraint
from mlx_core.structured.sql import wikisql_grammar
from mlx_core.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 64  # a WikiSQL answer is 15-40 tokens; room to see whether the model stops
DEFAULT_BATCH_SIZE = 32
DEFAULT_SAMPLES = 3
ADAPTER_ID = "eval"  # the one adapter's name inside the evaluation's AdapterSlots

# How a generation ended.
EOS, STOP_SEQUENCE, LENGTH = "eos", "stop_sequence", "length"


class EvalError(LoraforgeError, ValueError):
    """Evaluation settings that cannot work; the message says which flag to change."""


# -- data ---------------------------------------------------------------------------------------
def load_eval_examples(data: str | Path, split: str = "test") -> tuple[Path, list[Example]]:
    """The examples of `data`: a JSONL file, or a folder's `{split}.jsonl`; returns (file, examples)."""
    path = Path(data)
    if path.is_file():
        return path, read_jsonl(path)
    files = find_split_files(path)  # raises FileNotFoundError naming what it expected
    if split not in files:
        raise FileNotFoundError(
            f"no {split}.jsonl in {path} (found {', '.join(p.name for p in files.values())}): "
            f"pass --split {' or --split '.join(files)}, or a JSONL file as --data"
        )
    return files[split], read_jsonl(files[split])


@dataclass(frozen=True)
class SqlCase:
    """One text-to-SQL question as the model is asked it."""

    example: SqlExample  # table, columns, question; `answer` is the gold SQL
    gold: str  # example.answer, known to be present and to parse
    prompt: str  # the text prompt ending in "A:", or the last user message of a chat
    prompt_ids: tuple[int, ...]
    chat: bool  # the prompt is a chat template: the reply starts a new turn


def sql_cases(
    examples: Sequence[Example], tokenizer: Tokenizer, source: str = "data"
) -> list[SqlCase]:
    """Questions and gold SQL from text, prompt/completion or chat examples.

    Text: the prompt is everything up to and including "A:". Prompt/completion: the prompt as
    given (the table/columns/Q part), the completion is the gold. Chat: the conversation without
    its last assistant turn; the last user message holds table, columns and question. Raises
    DataFormatError naming the example when one is not a text-to-SQL example or its gold SQL
    does not parse (the metrics could not score it).
    """
    cases = []
    for number, ex in enumerate(examples, start=1):
        where = f"{source}: example {number}"
        try:
            case = _sql_case(ex, tokenizer)
        except (ExampleFormatError, SqlParseError) as e:
            raise DataFormatError(
                f"{where} is not a scorable text-to-SQL example ({e}) — evaluate 'table:/columns:/"
                "Q:/A:' examples, fix or remove this one, or pass --no-sql to measure only the loss"
            ) from None
        cases.append(case)
    return cases


def _sql_case(ex: Example, tokenizer: Tokenizer) -> SqlCase:
    if isinstance(ex, TextExample):
        example = parse_example(ex.text)
        prompt = prompt_of(ex.text)
        ids, chat = tokenizer.encode(prompt), False
    elif isinstance(ex, PromptCompletionExample):
        # The prompt may or may not end in "A:"; the model gets it verbatim, as in training.
        example = replace(parse_example(ex.prompt), answer=ex.completion.strip() or None)
        prompt = ex.prompt
        ids, chat = tokenizer.encode(prompt), False
    else:
        *asked, reply = ex.messages
        user = [m for m in asked if m.role == "user"][-1]
        example = replace(parse_example(user.content), answer=reply.content.strip() or None)
        prompt = user.content
        ids, chat = tokenizer.encode_chat(asked, add_generation_prompt=True), True
    if example.answer is None:
        raise ExampleFormatError("no gold SQL after the question")
    parse_query(example.answer, example.columns, example.table)  # fail now, not after generating
    return SqlCase(example, example.answer, prompt, tuple(ids), chat)


# -- generation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    text: str  # as the engine returned it (cut at a stop sequence if one was given)
    finish: str  # EOS | STOP_SEQUENCE | LENGTH
    n_tokens: int  # generated tokens, the EOS included


@dataclass
class ServedAdapter:
    """An adapter resident in the model's slots, as `loraforge generate --adapter` serves it."""

    slots: AdapterSlots
    adapter_id: str = ADAPTER_ID


def attach_adapter(model: Mistral, path: str | Path) -> ServedAdapter:
    """Load an adapter (folder or .npz) into slot 1 of the model; raises if it does not fit."""
    from mlx_core.lora.formats import load_adapter

    adapter = load_adapter(path, model.args)
    adapter.check_fits(model.args)
    slots = AdapterSlots(
        model, max_loaded=1, max_rank=max(adapter.rank, 1), loader=lambda _: adapter
    )
    return ServedAdapter(slots)


def generate_all(
    engine: Engine,
    cases: Sequence[SqlCase],
    params: SamplingParams,
    adapter_id: str | None = None,
    constrain: str | None = None,
) -> list[Generation]:
    """One generation per case, all queued at once: the engine batches up to its max_num_seqs.

    `constrain="sql"` holds each answer to WikiSQL notation over its own table's columns, its
    string values to spans of the question.
    """
    requests = [
        GenerationRequest(
            str(i),
            list(c.prompt_ids),
            params,
            adapter_id,
            c.chat,
            constraint=_sql_constraint(c) if constrain == "sql" else None,
        )
        for i, c in enumerate(cases)
    ]
    prepared = []
    for req, case in zip(requests, cases):
        try:  # check them all before queueing any, so a bad one leaves the engine empty
            prepared.append(engine.prepare(req))
        except EngineError as e:
            raise EngineError(
                f"example {int(req.request_id) + 1} (table {case.example.table}): {e}"
            ) from None
    for p in prepared:
        engine.submit(p)
    texts: list[list[str]] = [[] for _ in cases]
    ends: dict[int, Generation] = {}
    eos = engine.tokenizer.eos_id
    while engine.has_work():
        for out in engine.step():
            i = int(out.request_id)
            texts[i].append(out.text)
            if out.finish_reason is None:
                continue
            if out.finish_reason == "stop":
                # The engine says "stop" for EOS and for a stop sequence; only EOS is the model's own.
                finish = EOS if out.tokens and out.tokens[-1] == eos else STOP_SEQUENCE
            else:
                finish = LENGTH
            ends[i] = Generation("".join(texts[i]), finish, out.completion_tokens)
    missing = [i for i in range(len(cases)) if i not in ends]
    if missing:  # an engine bug, not a user error: say so plainly
        raise RuntimeError(
            f"the engine finished without answering example {missing[0] + 1}; please report this"
        )
    return [ends[i] for i in range(len(cases))]


# -- scoring ------------------------------------------------------------------------------------
def first_line(text: str) -> str:
    """The SQL a reader takes from a generation: leading space dropped, cut at the first newline."""
    return text.lstrip().split("\n", 1)[0].strip()


@dataclass(frozen=True)
class SqlSample:
    question: str
    prompt: str
    generated: str  # as generated
    predicted: str  # its first line: the SQL that is scored
    gold: str
    finish: str
    exact: bool
    execution: bool


@dataclass
class SqlEvalReport:
    n: int
    max_tokens: int
    stop: tuple[str, ...]  # stop sequences given to generation (none: measure stopping)
    stop_rate: float  # fraction that ended with EOS, i.e. the model stopped by itself
    stop_sequence_rate: float  # fraction cut by a stop sequence
    length_rate: float  # fraction that ran to max_tokens
    mean_generated_tokens: float  # EOS counted
    exact_match: float  # on the first line of each generation
    execution_accuracy: float  # on the first line
    exact_match_as_generated: float  # on the whole generation, as a client without stop gets it
    execution_accuracy_as_generated: float
    valid_sql_rate: float  # first lines that parse as WikiSQL for their table
    seconds: float = 0.0  # generation wall time
    generated_tokens_per_second: float = 0.0
    samples: list[SqlSample] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


def score_sql(
    cases: Sequence[SqlCase],
    generations: Sequence[Generation],
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    n_samples: int = DEFAULT_SAMPLES,
    seconds: float = 0.0,
) -> SqlEvalReport:
    """Stop rates and exact/execution accuracy of `generations` (one per case, same order)."""
    if len(cases) != len(generations):
        raise ValueError(
            f"{len(cases)} cases but {len(generations)} generations; pass one per case"
        )
    if not cases:
        raise EvalError(
            "no examples to evaluate: check that --data has examples and --max-examples is above 0"
        )
    n = len(cases)
    exact = execution = exact_raw = execution_raw = valid = 0
    samples: list[SqlSample] = []
    for case, gen in zip(cases, generations):
        ex, gold = case.example, case.gold
        predicted, raw = first_line(gen.text), gen.text.strip()
        hit = exact_match(predicted, gold)
        runs = execution_match(ex, predicted, gold)
        exact += hit
        execution += runs
        exact_raw += exact_match(raw, gold)
        # Identical text needs no second run of the tables.
        execution_raw += runs if raw == predicted else execution_match(ex, raw, gold)
        valid += _parses(predicted, ex)
        if len(samples) < n_samples:
            samples.append(
                SqlSample(
                    ex.question, case.prompt, gen.text, predicted, gold, gen.finish, hit, runs
                )
            )
    tokens = sum(g.n_tokens for g in generations)
    ended = [g.finish for g in generations]
    return SqlEvalReport(
        n=n,
        max_tokens=max_tokens,
        stop=tuple(stop),
        stop_rate=ended.count(EOS) / n,
        stop_sequence_rate=ended.count(STOP_SEQUENCE) / n,
        length_rate=ended.count(LENGTH) / n,
        mean_generated_tokens=tokens / n,
        exact_match=exact / n,
        execution_accuracy=execution / n,
        exact_match_as_generated=exact_raw / n,
        execution_accuracy_as_generated=execution_raw / n,
        valid_sql_rate=valid / n,
        seconds=seconds,
        generated_tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        samples=samples,
    )


def _parses(sql: str, ex: SqlExample) -> bool:
    try:
        parse_query(sql, ex.columns, ex.table)
    except SqlParseError:
        return False
    return True


def _sql_constraint(case: SqlCase) -> Constraint:
    ex = case.example
    # values copied from the question, as /v1/sql constrains them by default
    return Constraint("grammar", wikisql_grammar(ex.table, ex.columns, values_from=ex.question))


def evaluate_sql(
    model: Mistral,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop: Sequence[str] = (),
    adapter: ServedAdapter | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    source: str = "data",
    constrain: str | None = None,
) -> SqlEvalReport:
    """Generate greedily for every example (batch_size at a time) and score the SQL.

    No stop sequence by default, so `stop_rate` shows whether the model ends with EOS; pass
    stop=("\\n",) to see what a stop sequence rescues. `constrain="sql"` scores the model under
    the SQL constraint (answers hold to each table's columns, string values to spans of the
    question), as /v1/sql serves it by default.
    """
    if max_tokens < 1:
        raise EvalError(f"--max-tokens {max_tokens}: use 1 or more (64 fits any WikiSQL answer)")
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size}: use 1 or more (32 is a good default)")
    cases = sql_cases(examples, tokenizer, source)
    if not cases:
        raise EvalError(
            "no examples to evaluate: check that --data has examples and --max-examples is above 0"
        )
    engine = Engine(
        model, tokenizer, max_num_seqs=batch_size, adapter_slots=adapter.slots if adapter else None
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=tuple(stop))
    start = time.perf_counter()
    if constrain not in (None, "sql"):
        raise EvalError(f"--constrain {constrain}: the only constraint here is sql")
    generations = generate_all(
        engine, cases, params, adapter.adapter_id if adapter else None, constrain
    )
    seconds = time.perf_counter() - start
    return score_sql(
        cases, generations, max_tokens=max_tokens, stop=stop, n_samples=n_samples, seconds=seconds
    )
