"""`loraforge eval | demo-data`: measure a model (plus adapter) on text-to-SQL, write demo data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_core.errors import LoraforgeError

if TYPE_CHECKING:
    from mlx_core.eval.text_to_sql import SqlEvalReport


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval",
        help="text-to-SQL metrics (stop rate, exact match, execution accuracy) and test loss",
        description="Generate greedily for each table/columns/Q/A example and score the SQL. No "
        "stop sequence unless --stop is given: whether the model ends with EOS is measured.",
    )
    e.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    e.add_argument("--adapter", default=None, help="adapter folder or .npz file to apply")
    e.add_argument(
        "--data", required=True, help="folder with {train,valid,test}.jsonl, or one JSONL file"
    )
    e.add_argument("--split", default="test", help="which file of a --data folder (default: test)")
    e.add_argument(
        "--max-examples", type=int, default=None, help="evaluate only the first N examples"
    )
    e.add_argument(
        "--max-tokens", type=int, default=64, help="generation limit per example (default 64)"
    )
    e.add_argument(
        "--batch-size", type=int, default=32, help="sequences generated together (default 32)"
    )
    e.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop sequence (repeatable), e.g. --stop '\\n' to see what it rescues; "
        "escapes \\n and \\t are understood",
    )
    e.add_argument("--samples", type=int, default=3, help="example rows to show (default 3)")
    e.add_argument("--no-sql", action="store_true", help="skip generation (with --loss: loss only)")
    e.add_argument("--loss", action="store_true", help="also compute test loss and perplexity")
    e.add_argument(
        "--loss-batch-size", type=int, default=8, help="examples per loss batch (default 8)"
    )
    e.add_argument("--max-batches", type=int, default=-1, help="loss batches to use (-1: all)")
    e.add_argument("--max-seq-len", type=int, default=2048, help="as in training (default 2048)")
    e.add_argument(
        "--mask-prompt",
        action="store_true",
        help="loss on completions only, as training with --mask-prompt",
    )
    e.add_argument(
        "--completion-after",
        default=None,
        metavar="MARKER",
        help="where a text example's answer starts (e.g. 'A:'), as in training",
    )
    e.add_argument(
        "--constrain",
        choices=["sql"],
        default=None,
        help="generate under the SQL constraint, as /v1/sql does by default (answers hold to "
        "each table's columns, string values to spans of the question)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.set_defaults(run=run_eval)

    from mlx_core.demo.schema_corpus import PARTS

    d = sub.add_parser(
        "demo-data",
        help="write a synthetic text-to-SQL data set (train/valid/test.jsonl)",
        description="Synthetic table/columns/Q/A examples in WikiSQL notation, on tables with "
        "random columns; no table appears in two splits. --part picks what the embedded model "
        "was trained on (train) or one of its held-out sets: vocabulary (words it never saw), "
        "phrasing (question templates it never saw), french (French questions, a style it "
        "never saw: the fine-tuning showcase). Chat lines (--chat-fraction) go to DIR/chat/, "
        "since a JSONL file holds one format.",
    )
    d.add_argument("--out", required=True, help="folder to write")
    d.add_argument("--n-train", type=int, default=2000)
    d.add_argument("--n-valid", type=int, default=200)
    d.add_argument("--n-test", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--part", choices=list(PARTS), default="train", help="default: train")
    d.add_argument(
        "--chat-fraction",
        type=float,
        default=0.0,
        help="fraction of examples written as chats, to DIR/chat/ (default 0)",
    )
    d.set_defaults(run=run_demo_data, needs_mlx=False)


# -- eval ---------------------------------------------------------------------------------------
def run_eval(ns: argparse.Namespace) -> int:
    from mlx_core.eval.loss import test_loss
    from mlx_core.eval.text_to_sql import (
        EvalError,
        attach_adapter,
        evaluate_sql,
        load_eval_examples,
    )
    from mlx_core.weights import load_model

    if ns.no_sql and not ns.loss:
        raise LoraforgeError("--no-sql leaves nothing to measure: add --loss, or drop --no-sql")
    if ns.max_examples is not None and ns.max_examples < 1:
        raise LoraforgeError(
            f"--max-examples {ns.max_examples}: use 1 or more, or leave it out for all"
        )
    path, examples = load_eval_examples(ns.data, ns.split)
    if ns.max_examples is not None:
        examples = examples[: ns.max_examples]
    loaded = load_model(_model_path(ns.model))
    adapter = attach_adapter(loaded.model, ns.adapter) if ns.adapter else None
    stop = tuple(_unescape(s) for s in ns.stop)
    try:
        sql = (
            None
            if ns.no_sql
            else evaluate_sql(
                loaded.model,
                loaded.tokenizer,
                examples,
                max_tokens=ns.max_tokens,
                batch_size=ns.batch_size,
                stop=stop,
                adapter=adapter,
                n_samples=ns.samples,
                source=str(path),
                constrain=ns.constrain,
            )
        )
        loss = (
            None
            if not ns.loss
            else test_loss(
                loaded.model,
                loaded.tokenizer,
                examples,
                batch_size=ns.loss_batch_size,
                max_batches=ns.max_batches,
                max_seq_len=ns.max_seq_len,
                mask_prompt=ns.mask_prompt,
                completion_after=ns.completion_after,
                adapter=adapter,
            )
        )
    except EvalError as e:
        raise LoraforgeError(str(e)) from e
    head = {
        "model": str(loaded.path),
        "adapter": ns.adapter,
        "data": str(path),
        "n_examples": len(examples),
    }
    if ns.json:
        print(
            json.dumps(
                {
                    **head,
                    "sql": sql.to_dict() if sql else None,
                    "loss": loss.to_dict() if loss else None,
                }
            )
        )
        return 0
    print(f"model {head['model']}" + (f" + adapter {ns.adapter}" if ns.adapter else ""))
    print(f"data  {path}: {len(examples)} examples")
    if sql is not None:
        _print_sql(sql)
    if loss is not None:
        print(
            f"test loss {loss.loss:.4f}  perplexity {loss.perplexity:.2f}  "
            f"({loss.n_tokens} target tokens, {loss.n_examples} examples)"
        )
    return 0


def _model_path(path: str | None) -> str:
    from mlx_core.demo import resolve_model_path

    try:
        return resolve_model_path(path)
    except ImportError as e:  # this build ships no embedded demo model yet
        raise LoraforgeError(
            f"no embedded default model in this installation ({e}): pass --model PATH "
            "(a model folder, e.g. one written by `loraforge convert`)"
        ) from e


def _unescape(text: str) -> str:
    # Shells pass "\n" as two characters; a stop sequence almost always means the newline.
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def _print_sql(r: SqlEvalReport) -> None:
    stop = ", ".join(repr(s) for s in r.stop) or "none (measuring whether the model stops)"
    print(f"generation: greedy, max {r.max_tokens} tokens, stop sequences: {stop}")
    print(f"  ended with EOS (stop rate)  {_pct(r.stop_rate)}")
    if r.stop:
        print(f"  cut by a stop sequence      {_pct(r.stop_sequence_rate)}")
    print(f"  ran to max tokens           {_pct(r.length_rate)}")
    print(
        f"  mean generated tokens       {r.mean_generated_tokens:6.1f}"
        f"   ({r.generated_tokens_per_second:.0f} tokens/s)"
    )
    print(f"  {'':26}  {'first line':>10}  {'as generated':>12}")
    print(
        f"  {'exact match':26}  {_pct(r.exact_match):>10}  {_pct(r.exact_match_as_generated):>12}"
    )
    print(
        f"  {'execution accuracy':26}  {_pct(r.execution_accuracy):>10}  "
        f"{_pct(r.execution_accuracy_as_generated):>12}"
    )
    print(f"  {'valid WikiSQL':26}  {_pct(r.valid_sql_rate):>10}")
    for i, s in enumerate(r.samples, start=1):
        verdict = "exact" if s.exact else "executes same" if s.execution else "wrong"
        print(f"[{i}] Q: {s.question}")
        print(f"    gold:      {s.gold}")
        shown = s.generated if len(s.generated) <= 160 else s.generated[:160] + "..."
        print(f"    generated: {shown!r}  ({s.finish}, {verdict})")


# -- demo-data ----------------------------------------------------------------------------------
def run_demo_data(ns: argparse.Namespace) -> int:
    from mlx_core.demo.schema_corpus import write_dataset

    out = Path(ns.out)
    if out.exists() and not out.is_dir():
        raise LoraforgeError(
            f"--out {out} is a file: pass a folder to write train/valid/test.jsonl into"
        )
    if ns.n_train + ns.n_valid + ns.n_test < 1:
        raise LoraforgeError("nothing to write: give --n-train, --n-valid or --n-test above 0")
    if not 0.0 <= ns.chat_fraction <= 1.0:
        raise LoraforgeError(f"--chat-fraction {ns.chat_fraction}: use a value between 0 and 1")
    try:
        write_dataset(
            out,
            ns.n_train,
            ns.n_valid,
            ns.n_test,
            ns.seed,
            part=ns.part,
            chat_fraction=ns.chat_fraction,
        )
    except ValueError as e:  # a negative size: the message names the fix
        raise LoraforgeError(f"{e} (flags --n-*)") from e
    for line in split_formats(out):
        print(line)
    return 0


def split_formats(out: Path) -> list[str]:
    """Rewrite out/{split}.jsonl so each file holds one format; return what is where.

    write_dataset mixes text and chat lines in one file, but a training file must use one format
    (mlx_core.data.formats.read_jsonl): text lines stay in out/, chat lines move to out/chat/. Empty
    files are removed, since a split file with no examples is an error to the trainer.
    """
    report = []
    for split in ("train", "valid", "test"):
        path = out / f"{split}.jsonl"
        text: list[str] = []
        chat: list[str] = []
        for line in path.read_text().splitlines() if path.exists() else []:
            (chat if "messages" in json.loads(line) else text).append(line)
        for dest, kept in ((path, text), (out / "chat" / f"{split}.jsonl", chat)):
            if kept:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text("".join(line + "\n" for line in kept))
                report.append(f"wrote {dest} ({len(kept)} examples)")
            elif dest.exists():
                dest.unlink()
    return report
