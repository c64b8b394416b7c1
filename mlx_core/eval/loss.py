"""Test-set loss: mean cross-entropy per target token and its perplexity, batched as in training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

from mlx_core.data.batches import Batch, eval_batches, tokenize_examples
from mlx_core.data.formats import (
    Example,
    TextExample,
)
from mlx_core.eval.text_to_sql import EvalError, ServedAdapter
from mlx_core.model import Mistral
from mlx_core.tokenizer import Tokenizer


@dataclass(frozen=True)
class LossReport:
    loss: float  # mean cross-entropy per target token (nats)
    perplexity: float
    n_tokens: int  # target tokens the mean is over
    n_examples: int  # examples evaluated (after dropping those too long for max_seq_len)

    def to_dict(self) -> dict:
        return asdict(self)


def test_loss(
    model: Mistral,
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    batch_size: int = 8,
    max_batches: int = -1,
    max_seq_len: int = 2048,
    mask_prompt: bool = False,
    completion_after: str | None = None,
    adapter: ServedAdapter | None = None,
) -> LossReport:
    """Test loss and perplexity, tokenized as the trainer does (train.evaluate_loss computes them).

    max_batches -1 means every example; with `adapter`, every row runs through its slot.
    """
    from mlx_core.train.step import evaluate_loss

    if batch_size < 1:
        raise EvalError(f"--loss-batch-size {batch_size}: use 1 or more")
    if mask_prompt and examples and isinstance(examples[0], TextExample) and not completion_after:
        raise EvalError(
            "--mask-prompt with {\"text\": ...} examples needs --completion-after MARKER (e.g. 'A:') "
            "to know where the answer starts; or leave out --mask-prompt"
        )
    tokenized, report = tokenize_examples(
        examples, tokenizer, max_seq_len, mask_prompt, completion_after
    )
    if not tokenized:
        raise EvalError(
            f"no example fits --max-seq-len {max_seq_len} ({report.n_dropped} dropped): raise --max-seq-len"
        )
    n_batches = -(-len(tokenized) // batch_size)
    if max_batches is not None and max_batches != -1:
        n_batches = min(n_batches, max_batches)
    counted = _Counted(eval_batches(tokenized, batch_size, n_batches, max_seq_len))
    slot = 0
    if adapter is not None:
        acquired = adapter.slots.acquire(adapter.adapter_id)
        assert acquired is not None  # attach_adapter's one slot is free: nothing else pins it
        slot = acquired
        # eval_batches pads every batch to batch_size rows, so one activation serves them all.
        adapter.slots.activate([slot] * batch_size)
    try:
        loss, ppl = evaluate_loss(model, counted)
    finally:
        if adapter is not None:
            adapter.slots.activate([])
            adapter.slots.release(slot)
    n_examples = min(len(tokenized), n_batches * batch_size)
    return LossReport(loss, ppl, counted.n_tokens, n_examples)


class _Counted:
    """Passes batches through, counting their target tokens (evaluate_loss returns only means)."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches, self.n_tokens = batches, 0

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            self.n_tokens += batch.n_target_tokens
            yield batch


test_loss.__test__ = False  # type: ignore[attr-defined]  # pytest would otherwise collect it wherever it is imported
