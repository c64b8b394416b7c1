"""The model's vocabulary as exact bytes, and llguidance's tokenizer built from it.

The matcher works on bytes: it needs what each token id adds to the text. Sentencepiece pieces
are not that: "▁" stands for a space, "<0x0A>" for the byte 0x0A, and encoding a fragment adds a
dummy-prefix space. llguidance.hf.from_tokenizer gets the dummy prefix wrong on Mistral's
tokenizer (" 2" becomes "▁▁" + "2", so after " FROM" only a two-space token is allowed), so the
table is built here from the sentencepiece model itself, once per model.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import llguidance
import numpy as np
import sentencepiece as spm

from ..tokenizer import Tokenizer

_SPACE_PIECE = "▁"
# A newline is a byte-fallback token in Mistral's vocabulary and no piece contains one, so
# encoding "\n" + text gives the dummy prefix, the newline byte, then text's own tokens.
_SENTINEL = "\n"


@dataclass(eq=False)
class Vocabulary:
    """Token id -> exact bytes for one model, with llguidance's tokenizer over the same table."""

    token_bytes: list[bytes]  # what each id adds to the text; b"" for special ids
    special_ids: frozenset[int]  # BOS, EOS, UNK: never text
    eos_id: int
    ll_tokenizer: llguidance.LLTokenizer = field(repr=False)

    @property
    def size(self) -> int:
        """Number of token ids (the model's logits may have more columns: padding)."""
        return len(self.token_bytes)

    @property
    def mask_words(self) -> int:
        """int32 words in one row's bitmask (one bit per token id)."""
        return (self.size + 31) // 32

    @cached_property
    def sorted_bytes(self) -> tuple[list[bytes], np.ndarray]:
        """Text tokens' bytes in sorted order and their ids: tokens starting with some bytes form
        one contiguous run (see `ids_starting_with`)."""
        order = sorted(
            (i for i, b in enumerate(self.token_bytes) if b), key=lambda i: self.token_bytes[i]
        )
        return [self.token_bytes[i] for i in order], np.array(order, dtype=np.int64)

    @cached_property
    def ids_of_bytes(self) -> dict[bytes, list[int]]:
        """Text tokens by their bytes (a space is both "▁" and the byte token <0x20>)."""
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(self.token_bytes):
            if b:
                table.setdefault(b, []).append(i)
        return table

    def ids_starting_with(self, prefix: bytes) -> np.ndarray:
        """Ids of the text tokens whose bytes begin with `prefix` (non-empty)."""
        keys, ids = self.sorted_bytes
        lo = bisect.bisect_left(keys, prefix)
        above = _successor(prefix)
        hi = len(keys) if above is None else bisect.bisect_left(keys, above, lo=lo)
        return ids[lo:hi]


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string that starts with `prefix` (None: none is)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


_cache: weakref.WeakKeyDictionary[Tokenizer, Vocabulary] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    """The model's Vocabulary, built on first use (~0.2 s for 32k tokens) and kept with the
    tokenizer object for as long as it lives."""
    with _lock:
        vocab = _cache.get(tokenizer)
        if vocab is None:
            vocab = build_vocabulary(tokenizer)
            _cache[tokenizer] = vocab
        return vocab


def build_vocabulary(tokenizer: Tokenizer) -> Vocabulary:
    """A fresh Vocabulary read from the tokenizer's sentencepiece model (use `vocabulary`)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    if sp.vocab_size() != tokenizer.vocab_size:
        raise ValueError(
            f"{tokenizer.path} has {sp.vocab_size()} ids but the loaded tokenizer has "
            f"{tokenizer.vocab_size}: reload the tokenizer from that file"
        )
    token_bytes: list[bytes] = []
    special: list[int] = []
    ll_tokens: list[bytes] = []  # llguidance wants special tokens' names, marked special
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            special.append(i)
            token_bytes.append(b"")
            ll_tokens.append(piece.encode())
            continue
        if sp.is_byte(i):
            value = bytes([int(piece[3:5], 16)])  # "<0x0A>"
        else:
            value = piece.replace(_SPACE_PIECE, " ").encode()
        token_bytes.append(value)
        ll_tokens.append(value)
    eos = tokenizer.eos_id
    wrapper = _SentencepieceWrapper(sp, ll_tokens, special, eos, tokenizer.bos_id)
    ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper))
    return Vocabulary(token_bytes, frozenset(special), eos, ll_tokenizer)


class _SentencepieceWrapper:
    """What llguidance.TokenizerWrapper reads: tokens, special ids, EOS/BOS and an encoder of text
    fragments (without sentencepiece's dummy-prefix space)."""

    def __init__(
        self,
        sp: spm.SentencePieceProcessor,
        tokens: list[bytes],
        special: Sequence[int],
        eos: int,
        bos: int,
    ) -> None:
        self._sp = sp
        self.tokens = tokens
        self.special_token_ids = list(special)
        self.eos_token_id = eos
        self.bos_token_id = bos
        self._head: list[int] = sp.encode(_SENTINEL)

    def __call__(self, text: bytes) -> list[int]:
        ids: list[int] = self._sp.encode(_SENTINEL + text.decode("utf-8", errors="replace"))
        if ids[: len(self._head)] != self._head:  # a vocabulary unlike Mistral's
            raise ValueError("cannot encode a text fragment without the dummy prefix")
        return ids[len(self._head) :]
