"""Fixtures of the structured-output tests: the real Mistral tokenizer, its exact-bytes
vocabulary and a mask computer (each built once per module: the vocabulary takes ~0.2 s)."""

from __future__ import annotations

import pytest

from mlx_core.structured import MaskComputer, vocabulary
from mlx_core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return vocabulary(tokenizer)


@pytest.fixture(scope="module")
def masks(vocab):
    computer = MaskComputer(vocab)
    yield computer
    computer.close()
