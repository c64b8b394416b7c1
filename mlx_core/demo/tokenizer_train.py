"""Train the demo model's sentencepiece tokenizer on corpus text.

The result is a Mistral-shaped tokenizer (unk 0, BOS 1, EOS 2, byte fallback, digits split, no
text normalization) with a small vocabulary, so `mlx_core.tokenizer.Tokenizer` reads it like
Mistral's own. Only the base model's training text goes in: a word of a held-out domain must then
be spelled from pieces the model has learned, instead of getting an id whose embedding training
never touched (LoRA, which leaves embeddings alone, could not repair that).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 1024
    model_type: str = "bpe"  # "bpe" or "unigram"
    max_sentences: int = 200_000  # lines to train on (the corpus repeats itself long before)


def _lines(texts: Iterable[str], limit: int) -> Iterator[str]:
    # One sentence per line of an example: newlines then never enter the vocabulary and are
    # written as the byte piece <0x0A>, as Mistral's tokenizer writes them.
    n = 0
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line
                n += 1
                if n >= limit:
                    return


def train_tokenizer(texts: Iterable[str], out: Path, config: TokenizerConfig) -> Path:
    """Write a sentencepiece model trained on `texts` to `out` (a tokenizer.model path).

    Deterministic for the same texts: input order is kept (no shuffling or sampling) and the
    trainer runs on one thread.
    """
    if config.model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type {config.model_type!r}: use 'bpe' or 'unigram'")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, config.max_sentences),
        model_writer=buffer,
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        character_coverage=1.0,  # every character of the corpus gets a piece; others use bytes
        byte_fallback=True,  # any text encodes, as with Mistral's tokenizer
        split_digits=True,  # one digit per token: numbers and table ids copy digit by digit
        normalization_rule_name="identity",  # text round-trips exactly (no NFKC, no space folding)
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        input_sentence_size=0,  # use every sentence given, in order
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return out
