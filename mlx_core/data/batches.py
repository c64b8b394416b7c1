"""Examples -> tokens with a loss mask -> padded (optionally packed) batches for training and eval.

Token layout of every example: BOS, the example's tokens, EOS. The EOS is always there and always
a target: a fine-tune that never sees EOS never learns to stop.

`max_seq_len` counts every token of an example, BOS and EOS included; an example of n tokens gives
n - 1 (input, target) pairs, so unpacked rows are at most max_seq_len - 1 wide and packed rows hold
up to max_seq_len pairs. Row widths are rounded up to a multiple of PAD_MULTIPLE (capped at
max_seq_len) so that mx.compile sees a few dozen shapes, not one per length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_core.data.formats import ChatExample, DataFormatError, Example, PromptCompletionExample
from mlx_core.tokenizer import Tokenizer

PAD_MULTIPLE = 32
# Length grouping shuffles examples, then sorts windows of this many batches by length: batches
# hold similar lengths (little padding) yet differ from epoch to epoch.
_BUCKET_BATCHES = 32


@dataclass(frozen=True)
class TokenizedExample:
    tokens: tuple[int, ...]
    loss_mask: tuple[bool, ...]  # True: tokens[i] is a target the model learns to predict


@dataclass
class TokenizeReport:
    n_examples: int  # examples given
    n_truncated: int  # kept, with their prompt cut from the left
    n_dropped: int  # left out: the completion alone does not fit
    max_seq_len: int

    @property
    def n_kept(self) -> int:
        return self.n_examples - self.n_dropped

    def warning(self) -> str | None:
        """One line for the trainer's log, or None when every example fit."""
        if not self.n_truncated and not self.n_dropped:
            return None
        what = []
        if self.n_truncated:
            cut = (
                "their prompts were cut"
                if not self.n_dropped
                else f"{self.n_truncated} had their prompts cut"
            )
            what.append(f"{cut} from the left")
        if self.n_dropped:
            one = self.n_dropped == 1
            what.append(
                f"{self.n_dropped} {'was' if one else 'were'} dropped because "
                f"{'its completion alone is' if one else 'their completions alone are'} longer"
            )
        n_long = self.n_truncated + self.n_dropped
        return (
            f"{n_long} of {self.n_examples} examples were longer than --max-seq-len "
            f"{self.max_seq_len}: {'; '.join(what)} (raise --max-seq-len to keep them whole)"
        )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class _Encoded:
    tokens: list[int]
    targets: list[bool]
    keep_from: int  # tokens[keep_from:] (completion + EOS) survive truncation whole


def _encode_prompt_completion(
    prompt: str, completion: str, tokenizer: Tokenizer, mask_prompt: bool
) -> _Encoded:
    # Boundary rule: tokens are exactly BOS + encode(prompt + completion) + EOS, the tokens a
    # user's prompt+answer would have. The completion starts at the first token where that
    # sequence departs from encode(prompt). A token that sentencepiece merged across the
    # boundary therefore belongs to the completion: it is learned, never silently skipped.
    full = tokenizer.encode(prompt + completion, add_bos=False)
    k = _common_prefix(tokenizer.encode(prompt, add_bos=False), full) if prompt else 0
    tokens = [tokenizer.bos_id, *full, tokenizer.eos_id]
    n_prompt = 1 + k
    targets = [False] + [not mask_prompt] * k + [True] * (len(tokens) - n_prompt)
    return _Encoded(tokens, targets, keep_from=n_prompt)


def _encode_chat(example: ChatExample, tokenizer: Tokenizer, mask_prompt: bool) -> _Encoded:
    messages = example.messages
    tokens = list(tokenizer.encode_chat(messages, add_generation_prompt=False))
    # Each assistant reply (content + its EOS) ends at an EOS of the conversation. Its length is
    # measured by encoding the conversation up to the reply twice, with and without it; both
    # share the same last user turn, so this holds even for templates that move the system
    # message into the last user turn (where prefixes of the whole conversation would differ).
    eos_at = [i for i, t in enumerate(tokens) if t == tokenizer.eos_id]
    replies = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if len(eos_at) != len(replies):
        raise ValueError(
            f"the chat template gave {len(eos_at)} EOS tokens for {len(replies)} assistant "
            "replies — the tokenizer's encode_chat must end every assistant reply with EOS"
        )
    spans: list[tuple[int, int]] = []
    for end_eos, i in zip(eos_at, replies, strict=True):
        asked = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        answered = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        n_reply = len(answered) - _common_prefix(asked, answered)
        start = end_eos + 1 - n_reply
        if list(answered[len(answered) - n_reply :]) != tokens[start : end_eos + 1]:
            raise ValueError(
                f"assistant reply {len(spans) + 1} tokenizes differently inside the "
                "conversation than on its own — mlx_core.tokenizer's encode_chat is not "
                "prefix-stable; please report this with the example"
            )
        spans.append((start, end_eos + 1))
    if mask_prompt:
        targets = [False] * len(tokens)
        for start, end in spans:
            targets[start:end] = [True] * (end - start)
    else:
        targets = [False] + [True] * (len(tokens) - 1)
    return _Encoded(tokens, targets, keep_from=spans[-1][0])


def _encode(
    example: Example,
    tokenizer: Tokenizer,
    mask_prompt: bool,
    completion_after: str | None,
    number: int,
) -> _Encoded:
    if isinstance(example, PromptCompletionExample):
        return _encode_prompt_completion(example.prompt, example.completion, tokenizer, mask_prompt)
    if isinstance(example, ChatExample):
        return _encode_chat(example, tokenizer, mask_prompt)
    if completion_after is not None:
        # The marker splits a text line into prompt and completion (WikiSQL's "A:"). The split
        # also protects the answer from truncation, so it applies with or without masking.
        cut = example.text.find(completion_after)
        if cut < 0:
            raise DataFormatError(
                f"example {number}: no {completion_after!r} in the text, so there is no "
                f"completion to learn — add {completion_after!r} before the answer in every "
                "example, or train without --completion-after"
            )
        cut += len(completion_after)
        return _encode_prompt_completion(
            example.text[:cut], example.text[cut:], tokenizer, mask_prompt
        )
    tokens = [tokenizer.bos_id, *tokenizer.encode(example.text, add_bos=False), tokenizer.eos_id]
    # Plain text has no prompt to protect: truncation keeps its end (and the EOS).
    return _Encoded(tokens, [False] + [True] * (len(tokens) - 1), keep_from=len(tokens) - 1)


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    max_seq_len: int,
    mask_prompt: bool = False,
    completion_after: str | None = None,
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize examples with BOS/EOS and a loss mask, fitting each into max_seq_len tokens.

    mask_prompt: only completions (prompt/completion, text split at `completion_after`) or
    assistant replies (chat), each with its EOS, are targets; otherwise every token but BOS is.
    An example longer than max_seq_len loses prompt tokens from the left (after BOS); one whose
    completion + EOS alone exceeds max_seq_len - 1 tokens is dropped. The report counts both.
    """
    if max_seq_len < 3:
        raise ValueError(
            f"max_seq_len {max_seq_len} cannot hold BOS, a token and EOS — use 3 or more"
        )
    out: list[TokenizedExample] = []
    report = TokenizeReport(len(examples), 0, 0, max_seq_len)
    for number, example in enumerate(examples, start=1):
        enc = _encode(example, tokenizer, mask_prompt, completion_after, number)
        tokens, targets = enc.tokens, enc.targets
        if len(tokens) > max_seq_len:
            if len(tokens) - enc.keep_from > max_seq_len - 1:
                report.n_dropped += 1
                continue
            report.n_truncated += 1
            tail = len(tokens) - (max_seq_len - 1)
            tokens, targets = tokens[:1] + tokens[tail:], targets[:1] + targets[tail:]
        out.append(TokenizedExample(tuple(tokens), tuple(targets)))
    return out, report


@dataclass
class Batch:
    inputs: mx.array  # (B, L) int32: tokens[:-1] per row, right-padded
    targets: mx.array  # (B, L) int32: tokens[1:]
    loss_mask: mx.array  # (B, L) float32: 1 where the target counts (never on padding)
    positions: mx.array | None  # (B, L) int32 RoPE positions, restarting per example; packed only
    segment_ids: mx.array | None  # (B, L) int32 example number in the row, -1 = padding; packed
    n_target_tokens: int  # sum of loss_mask (this rank's rows)
    n_tokens: int  # non-padding input tokens (this rank's rows)


def _pairs(example: TokenizedExample) -> int:
    """Positions an example takes in a row: one per (input, target) pair."""
    return len(example.tokens) - 1


def _pack_rows(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Split `order` into consecutive rows of at most `capacity` positions (greedy next-fit).

    Greedy is optimal for consecutive splits, so a listing made of k rows that fit is split
    into at most k rows: make_batch can rebuild the rows batch_plan found from indices alone.
    """
    rows: list[list[int]] = []
    used = capacity + 1
    for i in order:
        if used + lengths[i] > capacity:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += lengths[i]
    return rows


def _first_fit_decreasing(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    order = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order.tolist():
        size = int(lengths[i])
        # A linear scan is fine: rows are few (examples / examples-per-row) per epoch.
        for r, room in enumerate(free):
            if size <= room:
                rows[r].append(i)
                free[r] -= size
                break
        else:
            rows.append([i])
            free.append(capacity - size)
    return rows


def batch_plan(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    pack: bool,
    max_seq_len: int,
) -> list[list[int]]:
    """Example indices for each step of one epoch; the same for the same (seed, epoch).

    `lengths` are token counts of the tokenized examples. Every example appears exactly once.
    Unpacked: up to batch_size examples of similar length per step (only the last may be short).
    Packed: rows of up to max_seq_len positions filled first-fit-decreasing, batch_size rows per
    step, listed row after row.
    """
    _check_split(batch_size, 0, 1)
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    if pack:
        pairs = np.asarray(lengths, dtype=np.int64) - 1
        too_long = np.flatnonzero(pairs > max_seq_len)
        if too_long.size:
            raise ValueError(
                f"example {int(too_long[0])} has {int(pairs[too_long[0]]) + 1} tokens, more than "
                f"max_seq_len {max_seq_len} — tokenize with the same max_seq_len"
            )
        # Shuffling first makes ties (equal lengths) land in different rows each epoch.
        rows = _first_fit_decreasing(pairs, rng.permutation(n), max_seq_len)
        rows = [rows[r] for r in rng.permutation(len(rows))]
        return [
            [i for row in rows[s : s + batch_size] for i in row]
            for s in range(0, len(rows), batch_size)
        ]
    lens = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(n)
    window = batch_size * _BUCKET_BATCHES
    steps: list[list[int]] = []
    for w in range(0, n, window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")].tolist()
        steps.extend(chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size))
    return [steps[s] for s in rng.permutation(len(steps))]


def _check_split(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank {rank} of world_size {world_size} is not a valid process — "
            "ranks run from 0 to world_size - 1"
        )
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} does not split evenly over {world_size} processes — "
            f"use a multiple of {world_size}"
        )


def make_batch(
    examples: Sequence[TokenizedExample],
    indices: Sequence[int],
    batch_size: int,
    pack: bool,
    max_seq_len: int,
    pad_id: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Batch:
    """Arrays for one step: the global batch of `indices`, of which this rank gets its rows.

    Always batch_size // world_size rows (missing rows are all padding, loss mask 0), so every
    rank of every step has the same row count; the width is that of the widest row of the
    global batch, rounded up to PAD_MULTIPLE.
    """
    _check_split(batch_size, rank, world_size)
    sizes = [_pairs(examples[i]) for i in indices]
    if pack:
        rows = [
            [indices[j] for j in row] for row in _pack_rows(sizes, range(len(sizes)), max_seq_len)
        ]
    else:
        rows = [[i] for i in indices]
    if len(rows) > batch_size:
        how = "packed into" if pack else "in"
        raise ValueError(
            f"{len(indices)} examples do not fit {how} {batch_size} rows of max_seq_len "
            f"{max_seq_len} — build the step's indices with batch_plan"
        )
    widest = max((sum(_pairs(examples[i]) for i in row) for row in rows), default=1)
    if widest > max_seq_len:
        raise ValueError(
            f"a row needs {widest} positions, more than max_seq_len {max_seq_len} — "
            "tokenize with the same max_seq_len"
        )
    L = max(min(-(-widest // PAD_MULTIPLE) * PAD_MULTIPLE, max_seq_len), widest)

    n_local = batch_size // world_size
    local = rows[rank * n_local : (rank + 1) * n_local]
    inputs = np.full((n_local, L), pad_id, dtype=np.int32)
    targets = np.full((n_local, L), pad_id, dtype=np.int32)
    mask = np.zeros((n_local, L), dtype=np.float32)
    positions = np.zeros((n_local, L), dtype=np.int32)
    segments = np.full((n_local, L), -1, dtype=np.int32)
    for r, row in enumerate(local):
        at = 0
        for segment, i in enumerate(row):
            tokens, loss_mask = examples[i].tokens, examples[i].loss_mask
            n = len(tokens) - 1
            inputs[r, at : at + n] = tokens[:-1]
            targets[r, at : at + n] = tokens[1:]
            mask[r, at : at + n] = loss_mask[1:]
            positions[r, at : at + n] = np.arange(n)
            segments[r, at : at + n] = segment
            at += n
    return Batch(
        inputs=mx.array(inputs),
        targets=mx.array(targets),
        loss_mask=mx.array(mask),
        positions=mx.array(positions) if pack else None,
        segment_ids=mx.array(segments) if pack else None,
        n_target_tokens=int(mask.sum()),
        n_tokens=int((segments >= 0).sum()),
    )


class BatchStream:
    """Training batches step after step, epoch after epoch, for ever.

    Step s of the stream depends only on (examples, seed, s), so a run resumed with
    start_step=s sees exactly the batches the interrupted run would have seen.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        batch_size: int,
        seed: int,
        pack: bool,
        max_seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if not examples:
            raise ValueError(
                "no training examples — check --data, and if the tokenize report says "
                "examples were dropped, raise --max-seq-len"
            )
        if start_step < 0:
            raise ValueError(f"start_step {start_step} must be 0 or more")
        _check_split(batch_size, rank, world_size)
        self.examples = examples
        self.batch_size, self.seed, self.pack = batch_size, seed, pack
        self.max_seq_len, self.rank, self.world_size = max_seq_len, rank, world_size
        self._lengths = [len(e.tokens) for e in examples]
        self.step = start_step  # global step: the next batch returned is step `self.step`
        # Find the epoch holding start_step by counting steps per epoch (cheap: no arrays).
        self.epoch, self.step_in_epoch = 0, start_step
        self._plan = self._plan_for(0)
        while self.step_in_epoch >= len(self._plan):
            self.step_in_epoch -= len(self._plan)
            self.epoch += 1
            self._plan = self._plan_for(self.epoch)

    def _plan_for(self, epoch: int) -> list[list[int]]:
        return batch_plan(
            self._lengths, self.batch_size, self.seed, epoch, self.pack, self.max_seq_len
        )

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self.step_in_epoch >= len(self._plan):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._plan = self._plan_for(self.epoch)
        indices = self._plan[self.step_in_epoch]
        batch = make_batch(
            self.examples,
            indices,
            self.batch_size,
            self.pack,
            self.max_seq_len,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.step += 1
        self.step_in_epoch += 1
        return batch


def eval_batches(
    examples: Sequence[TokenizedExample],
    batch_size: int,
    max_batches: int | None,
    max_seq_len: int,
) -> Iterator[Batch]:
    """Unpacked batches of the examples in file order; max_batches None or -1 means all.

    The last batch is filled up with padding rows, so every batch has batch_size rows.
    """
    n_batches = -(-len(examples) // batch_size)
    if max_batches is not None and max_batches != -1:
        if max_batches < 0:
            raise ValueError(f"max_batches {max_batches}: use a count, or -1 for all batches")
        n_batches = min(n_batches, max_batches)
    for start in range(0, n_batches * batch_size, batch_size):
        indices = list(range(start, min(start + batch_size, len(examples))))
        yield make_batch(examples, indices, batch_size, pack=False, max_seq_len=max_seq_len)
