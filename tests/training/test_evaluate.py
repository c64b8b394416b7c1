"""`loraforge eval` and `demo-data`: the metrics count what they claim on outputs we control, the
CLI runs end to end on a tiny model, and an adapter is evaluated as `generate --adapter` serves it.

A random tiny model scores zero, so the numbers that matter are checked on scenarios with a known
answer: hand-written generations scored directly, and tiny models rewired so that one token
always wins (EOS: the model always stops; another token: it never does).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_core.data.formats import (
    ChatExample,
    PromptCompletionExample,
    TextExample,
    find_split_files,
    read_jsonl,
)
from mlx_core.eval import loss as eval_loss
from mlx_core.eval import text_to_sql as evaluate
from mlx_core.eval.text_to_sql import EOS, LENGTH, STOP_SEQUENCE, Generation, score_sql, sql_cases
from mlx_core.eval.wikisql import parse_example, prompt_of
from mlx_core.lora.formats import save_adapter
from mlx_core.lora.layers import apply_lora, load_adapter_into
from mlx_core.tokenizer import ChatMessage
from mlx_core.weights import load_model, save_model
from server.cli import main as cli
from tests.engine.test_lora import random_adapter

WIKISQL_TEST = Path("/work/shared/data/wikisql/test.jsonl")
SQL_KEYS = {
    "n", "max_tokens", "stop", "stop_rate", "stop_sequence_rate", "length_rate",
    "mean_generated_tokens", "exact_match", "execution_accuracy", "exact_match_as_generated",
    "execution_accuracy_as_generated", "valid_sql_rate", "seconds", "generated_tokens_per_second",
    "samples",
}  # fmt: skip


@pytest.fixture(scope="module")
def wikisql_lines(tmp_path_factory) -> Path:
    """Six real WikiSQL test lines (two tables) as a data folder's test.jsonl."""
    folder = tmp_path_factory.mktemp("wikisql")
    lines = WIKISQL_TEST.read_text().splitlines()[:6]
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def texts(folder: Path) -> list[str]:
    return [e.text for e in read_jsonl(folder / "test.jsonl")]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def eval_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "eval", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# -- scoring on generations we wrote ------------------------------------------------------------
def test_scores_count_eos_stops_and_what_the_first_line_rescues(wikisql_lines, tiny_model):
    cases = sql_cases([TextExample(t) for t in texts(wikisql_lines)[:4]], tiny_model.tokenizer)
    gold = [c.example.answer for c in cases]
    # Gold 4 with lower-case keywords, a doubled space and the value in lower case: not exact,
    # but it returns the same rows (text compares case-insensitively, as in WikiSQL).
    recased = (
        gold[3]
        .replace("SELECT", "select ")
        .replace(" WHERE", " where")
        .replace("'Jalen Rose'", "'jalen rose'")
    )
    assert "'jalen rose'" in recased
    gens = [
        Generation(" " + gold[0], EOS, 20),  # right, and stopped by itself
        Generation(" " + gold[1] + "\n\ntable: 1-2-3\ncolumns: A", LENGTH, 64),  # right, ran on
        Generation(" SELECT No. FROM 1-10015132-16", EOS, 12),  # valid SQL, wrong answer
        Generation(" " + recased, STOP_SEQUENCE, 30),
    ]
    r = score_sql(cases, gens, max_tokens=64, stop=("\n",), n_samples=2)
    assert (r.n, r.stop_rate, r.stop_sequence_rate, r.length_rate) == (4, 0.5, 0.25, 0.25)
    assert r.mean_generated_tokens == (20 + 64 + 12 + 30) / 4
    assert (r.exact_match, r.execution_accuracy) == (0.5, 0.75)
    # Without the cut at the first newline the run-on answer is lost.
    assert (r.exact_match_as_generated, r.execution_accuracy_as_generated) == (0.25, 0.5)
    assert r.valid_sql_rate == 1.0
    assert [s.finish for s in r.samples] == [EOS, LENGTH]
    assert r.samples[1].predicted == gold[1] and r.samples[1].execution
    assert json.loads(json.dumps(r.to_dict()))["stop"] == ["\n"]


def test_exact_match_needs_the_whole_generation_when_not_cut(wikisql_lines, tiny_model):
    cases = sql_cases([TextExample(t) for t in texts(wikisql_lines)[:2]], tiny_model.tokenizer)
    gold = [c.example.answer for c in cases]
    r = score_sql(
        cases,
        [Generation(" " + gold[0], EOS, 9), Generation(" " + gold[1] + "\nQ: x", LENGTH, 9)],
        max_tokens=9,
    )
    assert (r.exact_match, r.exact_match_as_generated) == (1.0, 0.5)
    assert (r.execution_accuracy, r.execution_accuracy_as_generated) == (1.0, 0.5)


def test_the_three_formats_ask_the_same_question(wikisql_lines, tiny_model):
    tok = tiny_model.tokenizer
    text = texts(wikisql_lines)[0]
    prompt = prompt_of(text)
    answer = parse_example(text).answer
    user = prompt.removesuffix("\nA:")
    as_text, as_pc, as_chat = (
        sql_cases([e], tok)[0]
        for e in (
            TextExample(text),
            PromptCompletionExample(prompt, " " + answer),
            ChatExample((ChatMessage("user", user), ChatMessage("assistant", answer))),
        )
    )
    assert as_text.example == as_pc.example == as_chat.example
    assert as_text.prompt_ids == as_pc.prompt_ids == tuple(tok.encode(prompt))
    assert as_chat.chat and as_chat.prompt_ids == tuple(
        tok.encode_chat([ChatMessage("user", user)])
    )


def test_non_sql_examples_are_refused_naming_the_example(tmp_path, tiny_hf_model, capsys):
    data = tmp_path / "data.jsonl"
    first = WIKISQL_TEST.read_text().splitlines()[0]
    data.write_text(first + "\n" + json.dumps({"text": "just some prose"}) + "\n")
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_hf_model), "--data", str(data))
    assert code == 2 and "example 2" in err and "--no-sql" in err
    # The loss alone works on any text.
    got = eval_json(
        capsys, "--model", str(tiny_hf_model), "--data", str(data), "--no-sql", "--loss"
    )
    assert got["sql"] is None and got["loss"]["n_examples"] == 2


# -- the CLI on tiny models ---------------------------------------------------------------------
def forced_model(src: Path, dst: Path, token: int) -> Path:
    """A copy of the tiny model whose next token is always `token`, whatever the input.

    Zeroed output projections leave the residual stream equal to the token embedding; embedding
    dimension 0 is set to 1 for every token and the final norm keeps only that dimension, so
    the normed state is (+c, 0, ..., 0) with c > 0, and only `token`'s lm_head row reads it.
    """
    loaded = load_model(src)
    model, D = loaded.model, loaded.args.dim
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    embed = np.array(model.model.embed_tokens.weight)
    embed[:, 0] = 1.0
    model.model.embed_tokens.weight = mx.array(embed)
    model.model.norm.weight = mx.array(np.eye(1, D, 0, dtype=np.float32)[0])
    head = np.zeros((loaded.args.vocab_size, D), dtype=np.float32)
    head[token, 0] = 10.0
    model.lm_head = nn.Linear(D, loaded.args.vocab_size, bias=False)
    model.lm_head.weight = mx.array(head)
    return save_model(dst, model, loaded.tokenizer)


def test_stop_rate_is_one_for_a_model_that_always_ends(
    tiny_hf_model, tiny_model, wikisql_lines, tmp_path, capsys
):
    model = forced_model(tiny_hf_model, tmp_path / "eos", tiny_model.tokenizer.eos_id)
    sql = eval_json(
        capsys, "--model", str(model), "--data", str(wikisql_lines), "--max-tokens", "16"
    )["sql"]
    assert (sql["stop_rate"], sql["length_rate"], sql["mean_generated_tokens"]) == (1.0, 0.0, 1.0)
    assert sql["samples"][0]["generated"] == "" and sql["exact_match"] == 0.0


def test_stop_rate_is_zero_for_a_model_that_never_ends(
    tiny_hf_model, tiny_model, wikisql_lines, tmp_path, capsys
):
    newline = tiny_model.tokenizer._sp.piece_to_id("<0x0A>")
    model = forced_model(tiny_hf_model, tmp_path / "nl", newline)
    args = ("--model", str(model), "--data", str(wikisql_lines), "--max-tokens", "7")
    sql = eval_json(capsys, *args)["sql"]
    assert (sql["stop_rate"], sql["stop_sequence_rate"], sql["length_rate"]) == (0.0, 0.0, 1.0)
    assert sql["mean_generated_tokens"] == 7.0 and sql["samples"][0]["generated"] == "\n" * 7
    # The same model with a newline stop sequence: cut at once, and not counted as stopping.
    sql = eval_json(capsys, *args, "--stop", "\\n")["sql"]
    assert (sql["stop_rate"], sql["stop_sequence_rate"], sql["length_rate"]) == (0.0, 1.0, 0.0)
    assert sql["mean_generated_tokens"] == 1.0 and sql["stop"] == ["\n"]


def test_eval_json_on_the_tiny_model(tiny_hf_model, wikisql_lines, capsys):
    got = eval_json(
        capsys,
        "--model",
        str(tiny_hf_model),
        "--data",
        str(wikisql_lines),
        "--max-tokens",
        "12",
        "--batch-size",
        "4",
        "--samples",
        "2",
        "--loss",
    )
    assert got["n_examples"] == 6 and got["data"].endswith("test.jsonl") and got["adapter"] is None
    sql = got["sql"]
    assert set(sql) == SQL_KEYS and sql["n"] == 6 and len(sql["samples"]) == 2
    for key in SQL_KEYS - {
        "n",
        "max_tokens",
        "stop",
        "samples",
        "seconds",
        "generated_tokens_per_second",
        "mean_generated_tokens",
    }:
        assert 0.0 <= sql[key] <= 1.0, key
    assert sql["stop_rate"] + sql["stop_sequence_rate"] + sql["length_rate"] == pytest.approx(1.0)
    assert sql["stop_rate"] < 1.0  # an untouched random model does not end every answer
    assert 1.0 <= sql["mean_generated_tokens"] <= 12.0
    sample = sql["samples"][0]
    assert sample["prompt"].endswith("\nA:") and sample["gold"].startswith("SELECT ")
    loss = got["loss"]
    assert loss["n_examples"] == 6 and loss["n_tokens"] > 0
    assert loss["loss"] > 0 and loss["perplexity"] == pytest.approx(math.exp(loss["loss"]))


def test_eval_prints_a_table(tiny_hf_model, wikisql_lines, capsys):
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_hf_model),
        "--data",
        str(wikisql_lines),
        "--max-examples",
        "2",
        "--max-tokens",
        "4",
        "--samples",
        "1",
    )
    assert code == 0
    for text in (
        "2 examples",
        "stop rate",
        "execution accuracy",
        "first line",
        "as generated",
        "[1] Q:",
    ):
        assert text in out
    assert "[2] Q:" not in out


def test_batched_generation_gives_each_example_its_own_answer(tiny_hf_model, wikisql_lines, capsys):
    args = (
        "--model",
        str(tiny_hf_model),
        "--data",
        str(wikisql_lines),
        "--max-tokens",
        "10",
        "--samples",
        "6",
    )
    one = eval_json(capsys, *args, "--batch-size", "1")["sql"]["samples"]
    many = eval_json(capsys, *args, "--batch-size", "4")["sql"]["samples"]
    assert [s["generated"] for s in many] == [s["generated"] for s in one]
    assert len({s["generated"] for s in one}) > 1  # the prompts really differ


def test_adapter_is_evaluated_as_generate_serves_it(
    tiny_hf_model, tiny_model, wikisql_lines, tmp_path, capsys
):
    folder = save_adapter(
        tmp_path / "adapter", random_adapter(tiny_model.args, ("q_proj", "down_proj"), (0, 1))
    )
    args = (
        "--model",
        str(tiny_hf_model),
        "--data",
        str(wikisql_lines),
        "--max-tokens",
        "8",
        "--samples",
        "1",
    )
    base = eval_json(capsys, *args)["sql"]["samples"][0]
    adapted = eval_json(capsys, *args, "--adapter", str(folder))
    sample = adapted["sql"]["samples"][0]
    assert adapted["adapter"] == str(folder) and sample["generated"] != base["generated"]
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        str(tiny_hf_model),
        "--adapter",
        str(folder),
        "--prompt",
        sample["prompt"],
        "--max-tokens",
        "8",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["text"] == sample["generated"]


# -- loss ---------------------------------------------------------------------------------------
def direct_loss(model, tokenizer, lines: list[str]) -> tuple[float, int]:
    """Mean cross-entropy over every token after BOS (EOS included), one example at a time."""
    total, n = 0.0, 0
    for text in lines:
        tokens = [tokenizer.bos_id, *tokenizer.encode(text, add_bos=False), tokenizer.eos_id]
        logits = model(mx.array([tokens[:-1]])).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, mx.array([tokens[1:]])).sum().item()
        n += len(tokens) - 1
    return total / n, n


@pytest.mark.slow
def test_test_loss_is_the_mean_cross_entropy_over_target_tokens(tiny_model, wikisql_lines):
    lines = texts(wikisql_lines)
    want, n = direct_loss(tiny_model.model, tiny_model.tokenizer, lines)
    got = eval_loss.test_loss(
        tiny_model.model, tiny_model.tokenizer, [TextExample(t) for t in lines], batch_size=4
    )
    assert (got.n_tokens, got.n_examples) == (n, 6)
    assert got.loss == pytest.approx(want, rel=1e-4)
    first = eval_loss.test_loss(
        tiny_model.model,
        tiny_model.tokenizer,
        [TextExample(t) for t in lines],
        batch_size=4,
        max_batches=1,
    )
    assert first.n_examples == 4 and first.n_tokens < n
    masked = eval_loss.test_loss(
        tiny_model.model,
        tiny_model.tokenizer,
        [TextExample(t) for t in lines],
        batch_size=4,
        mask_prompt=True,
        completion_after="A:",
    )
    assert masked.n_tokens < n / 2  # the answers (plus EOS) are the short part


@pytest.mark.slow
def test_test_loss_with_an_adapter_is_the_lora_models_loss(
    tiny_hf_model, tiny_model, wikisql_lines
):
    adapter = random_adapter(tiny_model.args, ("v_proj", "up_proj"), (1,))
    lines = texts(wikisql_lines)
    trained = load_model(tiny_hf_model).model  # as training sees it: LoRALinear layers
    apply_lora(trained, adapter.rank, adapter.scale, adapter.targets, adapter.layers)
    load_adapter_into(trained, adapter)
    want, _ = direct_loss(trained, tiny_model.tokenizer, lines)

    served = load_model(tiny_hf_model)
    folder = save_adapter(Path(wikisql_lines) / "adapter", adapter)
    slots = evaluate.attach_adapter(served.model, folder)
    examples = [TextExample(t) for t in lines]
    got = eval_loss.test_loss(served.model, served.tokenizer, examples, batch_size=4, adapter=slots)
    base = eval_loss.test_loss(served.model, served.tokenizer, examples, batch_size=4)
    assert got.loss == pytest.approx(want, rel=1e-4)
    assert abs(got.loss - base.loss) > 1e-3  # the adapter mattered, and was switched off again


# -- demo-data ----------------------------------------------------------------------------------
def tables(examples) -> set[str]:
    return {parse_example(e.text).table for e in examples}


def test_demo_data_writes_splits_that_share_no_table(tmp_path, capsys):
    out = tmp_path / "demo"
    code, printed, err = run_cli(
        capsys,
        "demo-data",
        "--out",
        str(out),
        "--n-train",
        "60",
        "--n-valid",
        "10",
        "--n-test",
        "12",
        "--part",
        "french",
        "--seed",
        "3",
    )
    assert code == 0, err
    splits = {s: read_jsonl(p) for s, p in find_split_files(out).items()}
    assert {s: len(e) for s, e in splits.items()} == {"train": 60, "valid": 10, "test": 12}
    assert all(isinstance(e, TextExample) for ex in splits.values() for e in ex)
    train, valid, test = (tables(splits[s]) for s in ("train", "valid", "test"))
    assert not (train & valid or train & test or valid & test)
    assert "train.jsonl (60 examples)" in printed


def test_demo_data_puts_chat_lines_in_their_own_files(tmp_path, tiny_hf_model, capsys):
    out = tmp_path / "mixed"
    code, _, err = run_cli(
        capsys,
        "demo-data",
        "--out",
        str(out),
        "--n-train",
        "40",
        "--n-valid",
        "0",
        "--n-test",
        "10",
        "--chat-fraction",
        "0.5",
    )
    assert code == 0, err
    text, chat = find_split_files(out), find_split_files(out / "chat")
    assert (
        set(text) == set(chat) == {"train", "test"}
    )  # no empty valid.jsonl for the trainer to trip on
    for split, n in (("train", 40), ("test", 10)):
        plain, chats = read_jsonl(text[split]), read_jsonl(chat[split])
        assert all(isinstance(e, TextExample) for e in plain)
        assert all(isinstance(e, ChatExample) for e in chats)
        assert len(plain) + len(chats) == n and plain and chats
    # Chats are evaluated as chats: the prompt is the user's message, the gold the reply.
    sql = eval_json(
        capsys, "--model", str(tiny_hf_model), "--data", str(out / "chat"), "--max-tokens", "4"
    )["sql"]
    assert sql["n"] == len(read_jsonl(chat["test"]))
    sample = sql["samples"][0]
    assert sample["prompt"].startswith("table: ") and "\nQ: " in sample["prompt"]
    assert not sample["prompt"].endswith("A:") and sample["gold"].startswith("SELECT ")


def test_demo_data_refuses_an_unknown_part(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo-data", "--out", str(tmp_path / "x"), "--part", "mountains"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'mountains'" in err and "french" in err


def test_missing_split_names_the_ones_there(tiny_hf_model, wikisql_lines, capsys):
    code, _, err = run_cli(
        capsys,
        "eval",
        "--model",
        str(tiny_hf_model),
        "--data",
        str(wikisql_lines),
        "--split",
        "valid",
    )
    assert code == 2 and "no valid.jsonl" in err and "--split test" in err


def test_eval_under_the_sql_constraint_writes_sql_over_each_table(wikisql_lines, capsys):
    # The embedded model on real WikiSQL tables: free, it reads most headers (these few lines all
    # parse); held to each table's columns, (nearly) all parse over that table, never fewer.
    args = ("--data", str(wikisql_lines), "--max-tokens", "64", "--samples", "0")
    free = eval_json(capsys, *args)["sql"]
    held = eval_json(capsys, *args, "--constrain", "sql")["sql"]
    assert held["valid_sql_rate"] >= 5 / 6
    assert held["valid_sql_rate"] >= free["valid_sql_rate"]
