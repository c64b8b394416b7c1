"""The demo model's pretraining: answer-only loss, bit-for-bit resume."""

from __future__ import annotations

import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_core.config import ModelArgs
from mlx_core.data.batches import eval_batches, tokenize_examples
from mlx_core.data.formats import TextExample
from mlx_core.demo.pretrain import (
    AnswerBatch,
    PretrainConfig,
    answer_loss,
    latest_checkpoint,
    pretrain,
)
from mlx_core.demo.schema_corpus import generate_examples
from mlx_core.model import Mistral
from mlx_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="module")
def examples(tokenizer):
    texts = generate_examples(24, seed=5)
    tokenized, _ = tokenize_examples(
        [TextExample(t) for t in texts], tokenizer, 256, mask_prompt=True, completion_after="A:"
    )
    return tokenized


def tiny_args(vocab_size: int) -> ModelArgs:
    return ModelArgs(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        vocab_size=vocab_size,
        head_dim=8,
        sliding_window=None,
    )


def test_answer_loss_is_the_masked_loss_of_the_full_model(tokenizer, examples) -> None:
    mx.random.seed(0)
    model = Mistral(tiny_args(tokenizer.vocab_size))
    batch = next(eval_batches(examples, 8, 1, 256))
    full = nn.losses.cross_entropy(model(batch.inputs).astype(mx.float32), batch.targets)
    expected = (full * batch.loss_mask).sum()
    b = AnswerBatch.of(batch)
    assert b.n_targets == int(batch.loss_mask.sum().item())
    got = answer_loss(model, b.inputs, b.positions, b.targets, b.mask, mx.array(1.0))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def _config(**kw) -> PretrainConfig:
    base = dict(
        steps=6,
        batch_size=4,
        learning_rate=3e-3,
        warmup_steps=1,
        max_seq_len=256,
        parallel_streams=2,
        log_every=1,
        eval_every=3,
        checkpoint_every=3,
        keep_checkpoints=3,
    )
    return PretrainConfig(**{**base, **kw})


def _params(model: Mistral) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


@pytest.mark.slow
def test_pretraining_learns_and_resumes_bit_for_bit(tmp_path, tokenizer, examples) -> None:
    args, identity = tiny_args(tokenizer.vocab_size), {"corpus": "test"}
    lines: list[str] = []
    straight, result = pretrain(
        args, examples, examples[:8], _config(), tmp_path, identity, log=lines.append
    )
    losses = [
        float(line.split("answer loss ")[1].split()[0]) for line in lines if "/6 answer" in line
    ]
    assert len(losses) == 6 and losses[-1] < losses[0], lines
    assert result.steps == 6

    # Lose the last checkpoint, as a crash after step 3 would; resuming redoes steps 4-6 exactly.
    shutil.rmtree(tmp_path / "checkpoints" / "step-6")
    assert latest_checkpoint(tmp_path).name == "step-3"
    resumed, _ = pretrain(
        args, examples, examples[:8], _config(), tmp_path, identity, resume=True, log=lines.append
    )
    assert any(line.startswith("resumed from") and line.endswith("at step 3") for line in lines), (
        lines
    )
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert mx.array_equal(a[name], b[name]).item(), name


def test_resume_with_other_settings_is_refused(tmp_path, tokenizer, examples) -> None:
    args = tiny_args(tokenizer.vocab_size)
    pretrain(
        args,
        examples,
        examples[:8],
        _config(steps=3),
        tmp_path,
        {"corpus": "a"},
        log=lambda _: None,
    )
    with pytest.raises(Exception, match="other settings"):
        pretrain(
            args,
            examples,
            examples[:8],
            _config(steps=3, learning_rate=1e-2),
            tmp_path,
            {"corpus": "a"},
            resume=True,
            log=lambda _: None,
        )
