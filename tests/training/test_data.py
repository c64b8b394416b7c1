"""Tokenized training data: EOS, prompt masks, truncation, and the batches the trainer gets."""

from __future__ import annotations

import importlib.resources
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_core.data.batches import (
    PAD_MULTIPLE,
    Batch,
    BatchStream,
    TokenizedExample,
    TokenizeReport,
    batch_plan,
    eval_batches,
    make_batch,
    tokenize_examples,
)
from mlx_core.data.formats import (
    ChatExample,
    DataFormatError,
    PromptCompletionExample,
    TextExample,
    read_jsonl,
)
from mlx_core.tokenizer import ChatMessage, Tokenizer

WIKISQL = Path("/work/shared/data/wikisql")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(
        importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    )


@pytest.fixture(scope="module")
def wikisql() -> list[TextExample]:
    return read_jsonl(WIKISQL / "valid.jsonl")[:20]  # type: ignore[return-value]


def targets_text(tokenizer: Tokenizer, example: TokenizedExample) -> list[str]:
    """The decoded text of each run of consecutive target tokens (EOS decodes to nothing)."""
    runs: list[list[int]] = []
    for i, (token, target) in enumerate(zip(example.tokens, example.loss_mask, strict=True)):
        if target:
            if i == 0 or not example.loss_mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


def test_every_example_starts_with_bos_and_ends_with_eos_as_a_target(
    tokenizer: Tokenizer, wikisql: list[TextExample]
) -> None:
    chat = ChatExample((ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!")))
    pc = PromptCompletionExample("Q: 1+1\nA:", " 2")
    for mask_prompt in (False, True):
        tokenized, report = tokenize_examples(
            [*wikisql, chat, pc], tokenizer, 512, mask_prompt=mask_prompt
        )
        assert report.n_examples == 22 and report.n_truncated == report.n_dropped == 0
        assert report.warning() is None
        for example in tokenized:
            assert example.tokens[0] == tokenizer.bos_id and not example.loss_mask[0]
            assert example.tokens[-1] == tokenizer.eos_id and example.loss_mask[-1]
            assert example.tokens.count(tokenizer.eos_id) == 1
            assert len(example.tokens) == len(example.loss_mask)


def test_text_without_masking_learns_every_token(
    tokenizer: Tokenizer, wikisql: list[TextExample]
) -> None:
    tokenized, _ = tokenize_examples(wikisql, tokenizer, 512, mask_prompt=True)
    for example, text in zip(tokenized, wikisql, strict=True):
        assert example.tokens == (*tokenizer.encode(text.text), tokenizer.eos_id)
        assert example.loss_mask == (False,) + (True,) * (len(example.tokens) - 1)


def test_wikisql_prompt_is_masked_up_to_the_answer_marker(
    tokenizer: Tokenizer, wikisql: list[TextExample]
) -> None:
    tokenized, _ = tokenize_examples(
        wikisql, tokenizer, 512, mask_prompt=True, completion_after="A:"
    )
    for example, text in zip(tokenized, wikisql, strict=True):
        # Same tokens as the whole line: the split changes the mask, never the tokenization.
        assert example.tokens == (*tokenizer.encode(text.text), tokenizer.eos_id)
        first_target = example.loss_mask.index(True)
        assert all(example.loss_mask[first_target:])
        prompt = tokenizer.decode(example.tokens[:first_target])
        assert prompt.endswith("\nA:") and text.text.startswith(prompt)
        sql = text.text.split("\nA: ", 1)[1]
        assert targets_text(tokenizer, example) == [sql]
        assert sql.startswith("SELECT ")

    # Without masking the marker only protects the answer from truncation.
    unmasked, _ = tokenize_examples(wikisql, tokenizer, 512, completion_after="A:")
    assert all(sum(e.loss_mask) == len(e.tokens) - 1 for e in unmasked)


def test_text_without_the_marker_is_an_error_naming_it(tokenizer: Tokenizer) -> None:
    examples = [TextExample("Q: x\nA: y"), TextExample("no answer here")]
    with pytest.raises(DataFormatError, match="example 2: no 'A:' in the text.* — add 'A:'"):
        tokenize_examples(examples, tokenizer, 64, mask_prompt=True, completion_after="A:")
    tokenize_examples(examples, tokenizer, 64, mask_prompt=True)  # no marker asked for: fine


def test_prompt_completion_tokens_equal_the_joined_text(
    tokenizer: Tokenizer, wikisql: list[TextExample]
) -> None:
    pairs = [PromptCompletionExample(*t.text.split(" SELECT", 1)) for t in wikisql[:5]]
    pairs = [PromptCompletionExample(p.prompt, " SELECT" + p.completion) for p in pairs]
    masked, _ = tokenize_examples(pairs, tokenizer, 512, mask_prompt=True)
    for example, pair in zip(masked, pairs, strict=True):
        assert example.tokens == (*tokenizer.encode(pair.prompt + pair.completion), 2)
        assert targets_text(tokenizer, example) == [pair.completion.lstrip()]
        assert tokenizer.decode(example.tokens[: example.loss_mask.index(True)]).endswith("A:")
    unmasked, _ = tokenize_examples(pairs, tokenizer, 512, mask_prompt=False)
    assert [e.tokens for e in unmasked] == [e.tokens for e in masked]
    assert all(e.loss_mask == (False,) + (True,) * (len(e.tokens) - 1) for e in unmasked)


def test_a_token_merged_across_the_boundary_belongs_to_the_completion(
    tokenizer: Tokenizer,
) -> None:
    # "hel" + "lo world": sentencepiece writes "▁hello", so the split falls inside a token.
    assert tokenizer.encode("hello world", add_bos=False)[0] not in tokenizer.encode("hel")
    [example], _ = tokenize_examples(
        [PromptCompletionExample("say: hel", "lo world")], tokenizer, 64, mask_prompt=True
    )
    assert example.tokens == (*tokenizer.encode("say: hello world"), tokenizer.eos_id)
    assert targets_text(tokenizer, example) == ["hello world"]


def test_chat_mask_covers_exactly_the_assistant_replies(tokenizer: Tokenizer) -> None:
    messages = (
        ChatMessage("system", "You write SQL."),
        ChatMessage("user", "Count the rows of t."),
        ChatMessage("assistant", "SELECT COUNT(*) FROM t"),
        ChatMessage("user", "Only where x > 1."),
        ChatMessage("assistant", "SELECT COUNT(*) FROM t WHERE x > 1"),
    )
    [masked], _ = tokenize_examples([ChatExample(messages)], tokenizer, 512, mask_prompt=True)
    [unmasked], _ = tokenize_examples([ChatExample(messages)], tokenizer, 512)
    expected = tokenizer.encode_chat(messages, add_generation_prompt=False)
    assert masked.tokens == unmasked.tokens == tuple(expected)
    assert targets_text(tokenizer, masked) == [messages[2].content, messages[4].content]
    # Each reply's run of targets ends with the EOS that closes the turn.
    eos_at = [i for i, t in enumerate(masked.tokens) if t == tokenizer.eos_id]
    assert len(eos_at) == 2 and all(masked.loss_mask[i] for i in eos_at)
    assert not masked.loss_mask[eos_at[0] + 1]
    assert unmasked.loss_mask == (False,) + (True,) * (len(unmasked.tokens) - 1)


def long_prompt_examples() -> list[PromptCompletionExample]:
    return [
        PromptCompletionExample("Q: short\nA:", " yes"),
        PromptCompletionExample("Q: " + "very " * 40 + "long\nA:", " no"),
        PromptCompletionExample("Q: tiny\nA:", " " + "answer " * 40),
    ]


def test_truncation_cuts_prompts_from_the_left_and_drops_long_completions(
    tokenizer: Tokenizer,
) -> None:
    examples = long_prompt_examples()
    whole, _ = tokenize_examples(examples, tokenizer, 10_000, mask_prompt=True)
    assert len(whole[0].tokens) < 20 < len(whole[1].tokens) and len(whole[2].tokens) > 21
    kept, report = tokenize_examples(examples, tokenizer, 20, mask_prompt=True)
    assert (report.n_examples, report.n_truncated, report.n_dropped, report.n_kept) == (3, 1, 1, 2)
    assert report.warning() == (
        "2 of 3 examples were longer than --max-seq-len 20: 1 had their prompts cut from the "
        "left; 1 was dropped because its completion alone is longer (raise --max-seq-len to "
        "keep them whole)"
    )
    assert kept[0] == whole[0]
    cut = kept[1]
    assert len(cut.tokens) == 20 and cut.tokens[0] == tokenizer.bos_id
    # Everything after BOS is the end of the untruncated example: answer, EOS, the mask with them.
    assert cut.tokens[1:] == whole[1].tokens[-19:]
    assert cut.loss_mask == (False,) + whole[1].loss_mask[-19:]
    assert targets_text(tokenizer, cut) == ["no"]


def test_report_warning_wording() -> None:
    assert TokenizeReport(1000, 3, 0, 512).warning() == (
        "3 of 1000 examples were longer than --max-seq-len 512: their prompts were cut from the "
        "left (raise --max-seq-len to keep them whole)"
    )
    assert TokenizeReport(10, 0, 2, 64).warning() == (
        "2 of 10 examples were longer than --max-seq-len 64: 2 were dropped because their "
        "completions alone are longer (raise --max-seq-len to keep them whole)"
    )


def test_long_chat_loses_its_oldest_turns_but_never_the_last_reply(tokenizer: Tokenizer) -> None:
    messages = (
        ChatMessage("user", "Tell me a long story. " * 10),
        ChatMessage("assistant", "Once upon a time. " * 10),
        ChatMessage("user", "Shorter?"),
        ChatMessage("assistant", "The end."),
    )
    [whole], _ = tokenize_examples([ChatExample(messages)], tokenizer, 1000, mask_prompt=True)
    [cut], report = tokenize_examples([ChatExample(messages)], tokenizer, 40, mask_prompt=True)
    assert report.n_truncated == 1 and len(cut.tokens) == 40
    assert cut.tokens[1:] == whole.tokens[-39:] and cut.loss_mask[1:] == whole.loss_mask[-39:]
    assert targets_text(tokenizer, cut)[-1] == "The end."
    # The last reply is 3 tokens + EOS: with BOS it just fits in 5 tokens, not in 4.
    assert tokenizer.encode("The end.", add_bos=False) == list(cut.tokens[-4:-1])
    [tiny], report = tokenize_examples([ChatExample(messages)], tokenizer, 5, mask_prompt=True)
    assert tiny.tokens == (tokenizer.bos_id, *whole.tokens[-4:]) and report.n_dropped == 0
    out, report = tokenize_examples([ChatExample(messages)], tokenizer, 4, mask_prompt=True)
    assert out == [] and (report.n_truncated, report.n_dropped) == (0, 1)


def test_long_plain_text_keeps_its_end(tokenizer: Tokenizer) -> None:
    [whole], _ = tokenize_examples([TextExample("word " * 50)], tokenizer, 1000)
    [cut], report = tokenize_examples([TextExample("word " * 50)], tokenizer, 16)
    assert (report.n_truncated, report.n_dropped) == (1, 0)
    assert cut.tokens == (tokenizer.bos_id, *whole.tokens[-15:])
    assert cut.tokens[-1] == tokenizer.eos_id and cut.loss_mask == (False,) + (True,) * 15


def synthetic(lengths: list[int], vocab: int = 1000) -> list[TokenizedExample]:
    """Examples with distinct tokens (example i, position j), so rows can be traced back."""
    return [
        TokenizedExample(
            tokens=tuple(1 + (i * 97 + j) % vocab for j in range(n)),
            loss_mask=(False,) + tuple(j % 3 != 1 for j in range(1, n)),
        )
        for i, n in enumerate(lengths)
    ]


LENGTHS = [int(n) for n in np.random.default_rng(0).integers(3, 120, size=203)]


@pytest.mark.parametrize("pack", [False, True])
def test_plan_is_deterministic_and_covers_every_example_once(pack: bool) -> None:
    plan = batch_plan(LENGTHS, 8, seed=1, epoch=0, pack=pack, max_seq_len=128)
    assert plan == batch_plan(LENGTHS, 8, seed=1, epoch=0, pack=pack, max_seq_len=128)
    assert plan != batch_plan(LENGTHS, 8, seed=1, epoch=1, pack=pack, max_seq_len=128)
    assert plan != batch_plan(LENGTHS, 8, seed=2, epoch=0, pack=pack, max_seq_len=128)
    assert sorted(i for step in plan for i in step) == list(range(len(LENGTHS)))
    if not pack:
        assert [len(step) for step in plan].count(8) == len(plan) - 1  # only one short step
        assert len(plan) == -(-len(LENGTHS) // 8)


def test_plan_groups_similar_lengths() -> None:
    def padding(plan: list[list[int]]) -> int:
        return sum(
            max(LENGTHS[i] for i in step) * len(step) - sum(LENGTHS[i] for i in step)
            for step in plan
        )

    grouped = batch_plan(LENGTHS, 8, seed=1, epoch=0, pack=False, max_seq_len=128)
    order = np.random.default_rng(1).permutation(len(LENGTHS)).tolist()
    shuffled = [order[s : s + 8] for s in range(0, len(order), 8)]
    assert padding(grouped) * 4 < padding(shuffled)


def row_segments(batch: Batch, row: int) -> list[tuple[list[int], list[int], list[float]]]:
    """(inputs, targets, mask) of each example packed in one row, in segment order."""
    segments = np.array(batch.segment_ids[row])
    out = []
    for s in range(int(segments.max()) + 1):
        at = segments == s
        out.append(
            (
                np.array(batch.inputs[row])[at].tolist(),
                np.array(batch.targets[row])[at].tolist(),
                np.array(batch.loss_mask[row])[at].tolist(),
            )
        )
    return out


def test_packed_rows_fit_and_hold_the_same_examples_as_unpacked_rows() -> None:
    examples = synthetic(LENGTHS)
    plan = batch_plan(LENGTHS, 4, seed=3, epoch=0, pack=True, max_seq_len=128)
    # Packing does pack: the rows of all steps are over 90% full.
    assert sum(n - 1 for n in LENGTHS) > 0.9 * 128 * 4 * len(plan)
    packed_triples: list[tuple] = []
    for step in plan:
        batch = make_batch(examples, step, 4, pack=True, max_seq_len=128)
        assert batch.inputs.shape[0] == 4 and batch.inputs.shape[1] <= 128
        assert batch.inputs.dtype == mx.int32 and batch.loss_mask.dtype == mx.float32
        segments = np.array(batch.segment_ids)
        positions = np.array(batch.positions)
        assert ((segments >= 0).sum(axis=1) <= 128).all()
        assert batch.n_tokens == int((segments >= 0).sum())
        assert batch.n_target_tokens == int(np.array(batch.loss_mask).sum())
        assert (np.array(batch.loss_mask)[segments < 0] == 0).all()
        for row in range(4):
            for s, triple in enumerate(row_segments(batch, row)):
                assert positions[row][segments[row] == s].tolist() == list(range(len(triple[0])))
                packed_triples.append(tuple(tuple(x) for x in triple))
    unpacked_triples = []
    for i in range(len(examples)):
        batch = make_batch(examples, [i], 1, pack=False, max_seq_len=128)
        assert batch.positions is None and batch.segment_ids is None
        n = LENGTHS[i] - 1
        unpacked_triples.append(
            (
                tuple(np.array(batch.inputs[0, :n]).tolist()),
                tuple(np.array(batch.targets[0, :n]).tolist()),
                tuple(np.array(batch.loss_mask[0, :n]).tolist()),
            )
        )
    assert Counter(packed_triples) == Counter(unpacked_triples)


def test_unpacked_batch_layout() -> None:
    examples = synthetic([5, 40])
    batch = make_batch(examples, [0, 1], 3, pack=False, max_seq_len=128, pad_id=-7)
    assert batch.inputs.shape == (3, PAD_MULTIPLE * 2)  # 39 pairs -> 64: few shapes to compile
    inputs, targets = np.array(batch.inputs), np.array(batch.targets)
    mask = np.array(batch.loss_mask)
    assert inputs[0, :4].tolist() == list(examples[0].tokens[:-1])
    assert targets[0, :4].tolist() == list(examples[0].tokens[1:])
    assert mask[0, :4].tolist() == [float(m) for m in examples[0].loss_mask[1:]]
    assert (inputs[0, 4:] == -7).all() and (mask[0, 4:] == 0).all() and (inputs[2] == -7).all()
    assert batch.n_tokens == 4 + 39
    assert batch.n_target_tokens == sum(examples[0].loss_mask[1:]) + sum(examples[1].loss_mask[1:])
    # Widths round up to PAD_MULTIPLE but never past max_seq_len.
    assert make_batch(examples, [1], 1, pack=False, max_seq_len=50).inputs.shape == (1, 50)


def test_make_batch_rejects_what_does_not_fit() -> None:
    examples = synthetic([100, 100, 100])
    with pytest.raises(ValueError, match="do not fit packed into 1 rows .* — build the step's"):
        make_batch(examples, [0, 1], 1, pack=True, max_seq_len=128)
    with pytest.raises(ValueError, match="does not split evenly over 2 processes — use a multiple"):
        make_batch(examples, [0, 1, 2], 3, pack=False, max_seq_len=128, world_size=2)
    with pytest.raises(ValueError, match="more than max_seq_len 64 — tokenize with the same"):
        make_batch(examples, [0], 1, pack=False, max_seq_len=64)


@pytest.mark.parametrize("pack", [False, True])
def test_each_rank_takes_its_share_of_the_same_global_batch(pack: bool) -> None:
    examples = synthetic(LENGTHS)
    step = batch_plan(LENGTHS, 4, seed=0, epoch=0, pack=pack, max_seq_len=128)[0]
    whole = make_batch(examples, step, 4, pack=pack, max_seq_len=128)
    shares = [make_batch(examples, step, 4, pack, 128, rank=r, world_size=2) for r in range(2)]
    for field in ("inputs", "targets", "loss_mask", "positions", "segment_ids"):
        if getattr(whole, field) is None:
            assert all(getattr(share, field) is None for share in shares)
            continue
        joined = mx.concatenate([getattr(share, field) for share in shares])
        assert mx.array_equal(joined, getattr(whole, field)).item(), field
    assert sum(share.n_target_tokens for share in shares) == whole.n_target_tokens
    assert sum(share.n_tokens for share in shares) == whole.n_tokens


def same_batch(a: Batch, b: Batch) -> bool:
    arrays = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
    return all(
        (getattr(a, f) is None and getattr(b, f) is None)
        or mx.array_equal(getattr(a, f), getattr(b, f)).item()
        for f in arrays
    )


@pytest.mark.parametrize("pack", [False, True])
def test_stream_resumes_bit_for_bit(pack: bool) -> None:
    examples = synthetic(LENGTHS[:40])
    steps_per_epoch = len(batch_plan(LENGTHS[:40], 4, 5, 0, pack, 128))
    stream = BatchStream(examples, 4, seed=5, pack=pack, max_seq_len=128)
    batches = [next(stream) for _ in range(2 * steps_per_epoch + 3)]
    assert stream.step == len(batches) and stream.epoch == 2
    for k in (0, 1, steps_per_epoch, steps_per_epoch + 2, 2 * steps_per_epoch + 1):
        resumed = BatchStream(examples, 4, seed=5, pack=pack, max_seq_len=128, start_step=k)
        assert resumed.step == k
        for batch in batches[k:]:
            assert same_batch(next(resumed), batch)
    # The next epoch is a fresh shuffle, not a replay.
    epoch0, epoch1 = batches[:steps_per_epoch], batches[steps_per_epoch : 2 * steps_per_epoch]
    assert not all(same_batch(a, b) for a, b in zip(epoch0, epoch1, strict=True))


def test_stream_refuses_no_examples() -> None:
    with pytest.raises(ValueError, match="no training examples — check --data"):
        BatchStream([], 4, seed=0, pack=False, max_seq_len=128)


def test_eval_batches_keep_file_order(tokenizer: Tokenizer, wikisql: list[TextExample]) -> None:
    examples, _ = tokenize_examples(wikisql, tokenizer, 512)
    batches = list(eval_batches(examples, 6, None, 512))
    assert len(batches) == 4 == len(list(eval_batches(examples, 6, -1, 512)))
    assert [b.inputs.shape[0] for b in batches] == [6, 6, 6, 6]  # the last one padded with rows
    first = np.array(batches[0].inputs[0])
    assert first[: len(examples[0].tokens) - 1].tolist() == list(examples[0].tokens[:-1])
    last = np.array(batches[3].inputs)
    assert last[1, 0] == examples[19].tokens[0] and (last[2:] == 0).all()
    assert sum(b.n_target_tokens for b in batches) == sum(sum(e.loss_mask) for e in examples)
    assert len(list(eval_batches(examples, 6, 2, 512))) == 2
    assert list(eval_batches(examples, 6, 0, 512)) == []
