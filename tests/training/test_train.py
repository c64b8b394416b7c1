"""The LoRA trainer, used the way a user (or the job worker) uses it: train on a slice of WikiSQL,
read the events, resume, generate with the adapter, and run `loraforge lora` like the blog did."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from mlx_core.data.batches import make_batch, tokenize_examples
from mlx_core.data.formats import TextExample
from mlx_core.engine import Engine
from mlx_core.lora.formats import load_adapter
from mlx_core.lora.layers import apply_lora, lora_layer_indices
from mlx_core.lora.slots import AdapterSlots
from mlx_core.sampling import SamplingParams
from mlx_core.train.config import TrainConfig, TrainingConfigError
from mlx_core.train.events import (
    CheckpointEvent,
    DoneEvent,
    StartEvent,
    TrainerEvent,
    TrainEvent,
    decode_event,
)
from mlx_core.train.loop import train
from mlx_core.train.memory import MemoryPreflightError
from mlx_core.train.optim import build_optimizer
from mlx_core.train.step import TrainStep, enable_grad_checkpoint, evaluate_loss
from mlx_core.weights import load_model

WIKISQL = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikisql"
if not WIKISQL.is_dir():
    WIKISQL = Path("/work/shared/data/wikisql")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _wikisql_lines(split: str, n: int, short: bool = False) -> list[str]:
    lines = (WIKISQL / f"{split}.jsonl").read_text().splitlines()[:n]
    if not short:
        return lines
    # "Q: ...\nA: SELECT ..." only (no table/columns header): ~45 tokens, so steps stay cheap.
    out = []
    for line in lines:
        text = json.loads(line)["text"]
        out.append(json.dumps({"text": text[text.index("Q:") :]}))
    return out


def _data_dir(root: Path, n_train: int, n_valid: int, short: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("\n".join(_wikisql_lines("train", n_train, short)) + "\n")
    (root / "valid.jsonl").write_text("\n".join(_wikisql_lines("valid", n_valid, short)) + "\n")
    (root / "test.jsonl").write_text("\n".join(_wikisql_lines("test", n_valid, short)) + "\n")
    return root


@pytest.fixture(scope="module")
def wikisql_slice(tmp_path_factory) -> Path:
    return _data_dir(tmp_path_factory.mktemp("wikisql"), 8, 4, short=False)


@pytest.fixture(scope="module")
def short_qa(tmp_path_factory) -> Path:
    return _data_dir(tmp_path_factory.mktemp("qa"), 6, 2, short=True)


def _config(tmp: Path, **kw) -> TrainConfig:
    base: dict[str, Any] = dict(
        iters=3,
        batch_size=2,
        learning_rate=1e-3,
        steps_per_report=1,
        steps_per_eval=0,
        save_every=0,
        val_batches=1,
        lora_layers=-1,
        adapter_path=str(tmp / "adapter"),
        progress="lines",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_training_lowers_loss_reports_and_saves(tiny_hf_model, wikisql_slice, tmp_path, capsys):
    events: list[TrainerEvent] = []
    jsonl = tmp_path / "events.jsonl"
    config = _config(
        tmp_path,
        iters=8,
        learning_rate=1e-2,
        steps_per_report=2,
        steps_per_eval=4,
        save_every=4,
        keep_checkpoints=1,
        events_jsonl=str(jsonl),
    )
    result = train(tiny_hf_model, wikisql_slice, config, on_event=events.append)

    losses = [loss for _, loss in result.losses]
    assert len(losses) == 8
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert result.val_losses[0][0] == 0 and result.val_losses[-1][0] == 8
    assert result.val_losses[-1][1] < result.val_losses[0][1]

    # The seed's count line: q_proj (64 -> 64) and v_proj (64 -> 32) at rank 8 in both layers.
    per_layer = 8 * (64 + 64) + 8 * (64 + 32)
    out = capsys.readouterr().out
    assert f"Trainable parameters {2 * per_layer / 1e6:.3f}M" in out
    assert "Iter 2: Train loss" in out and "Peak mem" in out and "Iter 4: Val loss" in out

    # JSON lines: one event per line, the same ones on_event got.
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [decode_event(line) for line in jsonl.read_bytes().splitlines()] == events
    assert isinstance(events[0], StartEvent) and events[0].config.iters == 8
    kinds = [e["type"] for e in lines]
    assert kinds[0] == "start" and kinds[-1] == "done" and lines[-1]["status"] == "succeeded"
    assert {"train", "eval", "checkpoint"} <= set(kinds)
    for e in lines:
        assert isinstance(e["step"], int) and isinstance(e["time"], float)
    reports = [e for e in lines if e["type"] == "train"]
    assert [e["step"] for e in reports] == [2, 4, 6, 8]
    for e in reports:
        assert e["loss"] > 0 and e["it_per_sec"] > 0 and e["peak_memory_gb"] > 0
        assert e["tokens_per_sec"] >= e["target_tokens_per_sec"] > 0
        assert e["learning_rate"] == pytest.approx(1e-2)

    # The final adapter and the checkpoint are adapters the server can load.
    adapter = load_adapter(config.adapter_path)
    assert (
        adapter.rank == 8 and adapter.targets == ("q_proj", "v_proj") and adapter.layers == (0, 1)
    )
    assert [e["step"] for e in lines if e["type"] == "checkpoint"] == [4, 8]
    checkpoints = Path(config.adapter_path) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-8"]  # keep_checkpoints=1
    ckpt = checkpoints / "step-8"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.safetensors").is_file()
    assert load_adapter(ckpt).rank == 8


class _Killed(Exception):
    pass


def _kill_at_checkpoint(step: int):
    def on_event(event: TrainerEvent) -> None:
        if isinstance(event, CheckpointEvent) and event.step == step:
            raise _Killed  # what a crash right after the checkpoint looks like to the run

    return on_event


def _resume_config(tmp: Path, **kw) -> TrainConfig:
    # Dropout, warmup and a cosine schedule: every piece of state a resume must restore matters.
    return _config(
        tmp,
        iters=6,
        save_every=3,
        lora_dropout=0.1,
        lr_schedule="cosine",
        warmup_steps=2,
        optimizer="adamw",
        weight_decay=0.01,
        **kw,
    )


@pytest.fixture(scope="module")
def straight_run(tiny_hf_model, short_qa, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    return train(tiny_hf_model, short_qa, _resume_config(tmp))


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tiny_hf_model, short_qa, straight_run, tmp_path):
    config = _resume_config(tmp_path)
    with pytest.raises(_Killed):
        train(tiny_hf_model, short_qa, config, on_event=_kill_at_checkpoint(3))
    resumed = train(tiny_hf_model, short_qa, _resume_config(tmp_path, resume=True))

    assert resumed.resumed_from == Path(config.adapter_path) / "checkpoints" / "step-3"
    assert [s for s, _ in resumed.losses] == [4, 5, 6]
    straight = dict(straight_run.losses)
    for step, loss in resumed.losses:
        assert loss == pytest.approx(straight[step], abs=1e-6)
    a, b = load_adapter(straight_run.adapter_path), load_adapter(resumed.adapter_path)
    for key, (wa, wb) in a.weights.items():
        np.testing.assert_allclose(np.array(b.weights[key][0]), np.array(wa), atol=1e-6)
        np.testing.assert_allclose(np.array(b.weights[key][1]), np.array(wb), atol=1e-6)


@pytest.mark.parametrize(
    "change",
    [
        {"lora_rank": 4},
        {"targets": ("q_proj", "k_proj")},
        {"lora_layers": 1},
        {"batch_size": 3},
        {"data": "other"},
    ],
)
def test_resume_with_other_settings_is_refused(
    tiny_hf_model, short_qa, straight_run, tmp_path, change
):
    change = dict(change)
    data = short_qa
    if change.pop("data", None):
        data = _data_dir(tmp_path / "other", 5, 2, short=True)
    ckpt = Path(straight_run.adapter_path) / "checkpoints" / "step-3"
    events: list[TrainerEvent] = []
    with pytest.raises(TrainingConfigError) as err:
        train(
            tiny_hf_model,
            data,
            _resume_config(tmp_path, resume=str(ckpt), **change),
            on_event=events.append,
        )
    assert "other settings" in str(err.value) and "--adapter-path" in str(err.value)
    assert not [e for e in events if isinstance(e, TrainEvent)]  # refused before any step


def _losses(tiny_hf_model, data, tmp, **kw) -> list[float]:
    return [loss for _, loss in train(tiny_hf_model, data, _config(tmp, **kw)).losses]


@pytest.mark.slow
def test_grad_accumulation_trains_like_the_bigger_batch(tiny_hf_model, short_qa, tmp_path):
    big = _losses(tiny_hf_model, short_qa, tmp_path / "a", batch_size=4)
    accumulated = _losses(
        tiny_hf_model, short_qa, tmp_path / "b", batch_size=2, grad_accumulation=2
    )
    np.testing.assert_allclose(accumulated, big, rtol=1e-5)
    # The gradients themselves, not only the losses (Adam's first steps barely see their scale).
    g_big = _step_grads(tiny_hf_model, short_qa, batch_size=4, grad_accumulation=1)
    g_acc = _step_grads(tiny_hf_model, short_qa, batch_size=2, grad_accumulation=2)
    assert g_acc[0] == pytest.approx(g_big[0], rel=1e-5)
    _assert_same_grads(g_acc[1], g_big[1])


@pytest.mark.slow
def test_grad_checkpoint_gives_the_same_training(tiny_hf_model, short_qa, tmp_path):
    plain = _losses(tiny_hf_model, short_qa, tmp_path / "a")
    checkpointed = _losses(tiny_hf_model, short_qa, tmp_path / "b", grad_checkpoint=True)
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-5)
    g_plain = _step_grads(tiny_hf_model, short_qa, batch_size=4, grad_accumulation=1)
    g_ckpt = _step_grads(
        tiny_hf_model, short_qa, batch_size=4, grad_accumulation=1, checkpoint=True
    )
    assert g_ckpt[0] == pytest.approx(g_plain[0], rel=1e-5)
    _assert_same_grads(g_ckpt[1], g_plain[1])


def _lora_model(model_dir: Path, checkpoint: bool = False):
    loaded = load_model(model_dir)
    layers = lora_layer_indices(loaded.args.n_layers, -1)
    mx.random.seed(0)
    apply_lora(loaded.model, 8, 2.0, ALL_TARGETS, layers)
    if checkpoint:
        enable_grad_checkpoint(loaded.model, layers)
    # B starts at zero, which hides A's gradient: give B values so both get one.
    for layer in loaded.model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for m in owner.children().values():
                if hasattr(m, "lora_b"):
                    for t in m.lora_b:
                        m.lora_b[t] = mx.random.normal(m.lora_b[t].shape) * 0.1
    loaded.model.train()
    return loaded


def _step_grads(
    model_dir: Path,
    data_dir: Path,
    batch_size: int,
    grad_accumulation: int,
    checkpoint: bool = False,
    pack: bool = False,
):
    loaded = _lora_model(model_dir, checkpoint)
    examples = _tokenized(loaded.tokenizer, data_dir, 4)
    batch = make_batch(examples, list(range(4)), batch_size * grad_accumulation, pack, 128)
    config = TrainConfig(batch_size=batch_size, grad_accumulation=grad_accumulation, compile=False)
    step = TrainStep(loaded.model, build_optimizer("adam", 1e-3, "constant", 0, 1), config)
    return step.loss_and_grads(batch)


def _tokenized(tokenizer, data_dir: Path, n: int):
    texts = [
        json.loads(line)["text"] for line in (data_dir / "train.jsonl").read_text().splitlines()[:n]
    ]
    examples, _ = tokenize_examples([TextExample(t) for t in texts], tokenizer, 64)
    return examples


def _assert_same_grads(a: dict, b: dict) -> None:
    from mlx.utils import tree_flatten

    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys() and fa
    for k in fa:
        np.testing.assert_allclose(
            np.array(fa[k]), np.array(fb[k]), rtol=1e-4, atol=1e-6, err_msg=k
        )


def test_packed_and_unpacked_rows_give_the_same_loss(tiny_hf_model, short_qa):
    loaded = _lora_model(tiny_hf_model)
    examples = _tokenized(loaded.tokenizer, short_qa, 4)
    # Two ~45-token examples per packed row: past the tiny model's 24-token sliding window.
    packed = make_batch(examples, [0, 1, 2, 3], 2, pack=True, max_seq_len=128)
    unpacked = make_batch(examples, [0, 1, 2, 3], 4, pack=False, max_seq_len=128)
    assert packed.inputs.shape[0] == 2 and packed.segment_ids is not None
    assert packed.n_target_tokens == unpacked.n_target_tokens
    loss_p, _ = evaluate_loss(loaded.model, [packed])
    loss_u, _ = evaluate_loss(loaded.model, [unpacked])
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    g_packed = _step_grads(tiny_hf_model, short_qa, batch_size=2, grad_accumulation=1, pack=True)
    g_rows = _step_grads(tiny_hf_model, short_qa, batch_size=4, grad_accumulation=1)
    assert g_packed[0] == pytest.approx(g_rows[0], abs=1e-5)
    _assert_same_grads(g_packed[1], g_rows[1])


@pytest.mark.slow
def test_the_fine_tune_learns_to_stop(tiny_hf_model, tmp_path):
    """The seed trained without EOS, so its model rambled on after the SQL. Ours stops."""
    examples = [
        "Q: What is the format for South Australia?\nA: SELECT Format FROM t WHERE State = 'SA'",
        "Q: Who is the player number 3?\nA: SELECT Player FROM t WHERE No. = '3'",
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in examples))
    config = _config(
        tmp_path,
        iters=60,
        learning_rate=3e-3,
        steps_per_report=20,
        targets=ALL_TARGETS,
        mask_prompt=True,
        completion_after="A:",
    )
    train(tiny_hf_model, data, config)

    loaded = load_model(tiny_hf_model)
    adapter = load_adapter(config.adapter_path)
    slots = AdapterSlots(
        loaded.model, max_loaded=1, max_rank=adapter.rank, loader=lambda _: adapter
    )
    engine = Engine(loaded.model, loaded.tokenizer, adapter_slots=slots)
    params = SamplingParams(max_tokens=40, temperature=0.0)
    for text in examples:
        prompt, answer = text.split("A:")
        ids = loaded.tokenizer.encode(prompt + "A:")
        base = list(engine.generate(ids, params, None, request_id="base"))
        tuned = list(engine.generate(ids, params, "sql", request_id="tuned"))
        assert base[-1].finish_reason == "length"  # the random base never stops
        assert tuned[-1].finish_reason == "stop"
        assert tuned[-1].tokens == [loaded.tokenizer.eos_id]
        assert "".join(o.text for o in tuned) == answer


def test_settings_that_cannot_work_are_refused(tiny_hf_model, wikisql_slice, tmp_path):
    bad: list[dict[str, Any]] = [
        dict(weight_decay=0.1),
        dict(optimizer="sgd"),
        dict(warmup_steps=5, iters=5),
        dict(targets=("qkv",)),
        dict(quantize=3),
        dict(lora_layers=0),
        dict(batch_size=0),
    ]
    for kw in bad:
        with pytest.raises(TrainingConfigError):
            train(tiny_hf_model, wikisql_slice, _config(tmp_path, **kw))
    with pytest.raises(TrainingConfigError, match="--completion-after"):
        train(tiny_hf_model, wikisql_slice, _config(tmp_path, mask_prompt=True))


def test_memory_preflight_refuses_before_loading(tiny_hf_model, wikisql_slice, tmp_path):
    events: list[TrainerEvent] = []
    with pytest.raises(MemoryPreflightError) as err:
        train(
            tiny_hf_model,
            wikisql_slice,
            _config(tmp_path, memory_limit_gb=0.001),
            on_event=events.append,
        )
    message = str(err.value)
    assert "batch 2 with 2 LoRA layers needs ~" in message and "GB free: try" in message
    assert isinstance(events[-1], DoneEvent) and events[-1].status == "failed"


# -- `loraforge lora`: the blog's commands ---------------------------------------------------------
def _seed_format_model(model_dir: Path, out: Path) -> Path:
    """The folder mlx-examples' convert.py wrote: weights.npz (Mistral names) + params.json."""
    import torch

    from tests.models import hf_state_dict_to_mistral_pth

    pth = hf_state_dict_to_mistral_pth(model_dir, out / "pth")
    state = torch.load(pth / "consolidated.00.pth", weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "weights.npz", **{k: v.to(torch.float16).numpy() for k, v in state.items()})
    params = json.loads((pth / "params.json").read_text())
    (out / "params.json").write_text(json.dumps(params))
    (out / "tokenizer.model").write_bytes((pth / "tokenizer.model").read_bytes())
    import shutil

    shutil.rmtree(pth)
    return out


def _loraforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_lora_command_runs_the_blogs_commands(tiny_hf_model, wikisql_slice, tmp_path):
    model = _seed_format_model(tiny_hf_model, tmp_path / "mlx_model")
    # python lora.py --model <path_to_model> --train --iters 600  (the blog, with fewer iters)
    trained = _loraforge(
        "lora",
        "--model",
        str(model),
        "--train",
        "--data",
        str(wikisql_slice),
        "--iters",
        "4",
        "--batch-size",
        "2",
        "--steps-per-report",
        "2",
        "--steps-per-eval",
        "4",
        "--val-batches",
        "1",
        "--lora-layers",
        "2",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert "Trainable parameters" in trained.stdout and "Iter 4: Val loss" in trained.stdout
    assert (tmp_path / "adapters.npz").is_file() and (tmp_path / "adapters.json").is_file()
    assert load_adapter(tmp_path / "adapters.npz").layers == (0, 1)

    # python lora.py --model <path_to_model> --adapter-file adapters.npz --test
    tested = _loraforge(
        "lora",
        "--model",
        str(model),
        "--adapter-file",
        "adapters.npz",
        "--test",
        "--data",
        str(wikisql_slice),
        "--batch-size",
        "2",
        cwd=tmp_path,
    )
    assert tested.returncode == 0, tested.stderr
    line = next(x for x in tested.stdout.splitlines() if x.startswith("Test loss"))
    loss, ppl = (float(x.split()[-1].rstrip(".,")) for x in line.split(","))
    assert ppl == pytest.approx(np.exp(loss), rel=1e-2)

    # python lora.py --model <path_to_model> --adapter-file adapters.npz --num-tokens 50 --prompt ...
    prompt = (
        "table: 1-10015132-16\ncolumns: Player, No.\nQ: What is terrence ross' nationality\nA: "
    )
    generated = _loraforge(
        "lora",
        "--model",
        str(model),
        "--adapter-file",
        "adapters.npz",
        "--num-tokens",
        "8",
        "--temp",
        "0",
        "--prompt",
        prompt,
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    assert "Generating" in generated.stdout
    after = generated.stdout.split("Generating\n", 1)[1]
    assert after.startswith(prompt) and after[len(prompt) :].strip()


@pytest.mark.slow
def test_train_command_trains_and_tests(tiny_hf_model, wikisql_slice, tmp_path):
    out = tmp_path / "adapter"
    done = _loraforge(
        "train",
        "--model",
        str(tiny_hf_model),
        "--data",
        str(wikisql_slice),
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--lora-layers",
        "1",
        "--targets",
        "q_proj,o_proj",
        "--lora-rank",
        "4",
        "--steps-per-eval",
        "0",
        "--max-seq-len",
        "64",
        "--adapter-path",
        str(out),
        "--events-jsonl",
        str(tmp_path / "ev.jsonl"),
        "--test",
        "--test-batches",
        "1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Test loss" in done.stdout and "Test ppl" in done.stdout
    adapter = load_adapter(out)
    assert (adapter.rank, adapter.targets, adapter.layers) == (4, ("q_proj", "o_proj"), (1,))
    events = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    start = next(e for e in events if e["type"] == "start")
    assert start["config"]["targets"] == ["q_proj", "o_proj"] and events[-1]["type"] == "done"
    # WikiSQL rows are ~90 tokens: at --max-seq-len 64 the user is told, not silently cut.
    warnings = [(e["code"], e["message"]) for e in events if e["type"] == "warning"]
    assert any(
        code == "examples_too_long" and w.startswith("train.jsonl: 8 of 8 examples were longer")
        for code, w in warnings
    )
    assert "[WARNING] train.jsonl:" in done.stdout and "raise --max-seq-len" in done.stdout
    # Settings that cannot work: one line saying what to change, exit 2.
    bad = _loraforge(
        "train",
        "--model",
        str(tiny_hf_model),
        "--data",
        str(wikisql_slice),
        "--weight-decay",
        "0.1",
        cwd=tmp_path,
    )
    assert (
        bad.returncode == 2 and "--optimizer adamw" in bad.stderr and "Traceback" not in bad.stderr
    )


@pytest.mark.slow
def test_lora_command_says_what_is_missing(tmp_path, tiny_hf_model):
    missing = _loraforge(
        "lora",
        "--model",
        str(tiny_hf_model),
        "--adapter-file",
        "nope.npz",
        "--test",
        "--data",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert "nope.npz" in missing.stderr and "--train" in missing.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_that_resume_continues(tiny_hf_model, wikisql_slice, tmp_path):
    import signal

    args = ["train", "--model", str(tiny_hf_model), "--data", str(wikisql_slice)]
    args += ["--iters", "400", "--batch-size", "2", "--steps-per-report", "1"]
    args += ["--steps-per-eval", "0", "--save-every", "0", "--adapter-path", "ad"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until it is training, then press Ctrl-C
        lines.append(line)
        if line.startswith("Iter 3:"):
            proc.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "ETA " in out and "in the loss" in out
    stopped = re.search(r"Interrupted at step (\d+) of 400", out)
    assert stopped, out
    step = int(stopped.group(1))
    assert (tmp_path / "ad" / "checkpoints" / f"step-{step}").is_dir()
    # The same command with --resume starts where it stopped (and a few steps are enough here).
    resumed = _loraforge(*args[:6], str(step + 2), *args[7:], "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"Iter {step + 1}:" in resumed.stdout and "Iter 1:" not in resumed.stdout
