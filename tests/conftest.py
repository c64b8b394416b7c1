"""Shared fixtures: tiny random Mistral models written in the real formats, with Mistral's real
tokenizer.model (shipped inside the mistral-common package)."""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

import pytest

from tests.models import TINY, write_hf_model


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, tokenizer_path) -> Path:
    """A 2-layer MistralForCausalLM saved by transformers (fp32 safetensors + config.json)."""
    out = tmp_path_factory.mktemp("tiny-hf")
    write_hf_model(out, tokenizer_path, TINY, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_model):
    """The tiny model loaded through our loader (session-wide: tests must not modify it)."""
    from mlx_core.weights import load_model

    return load_model(tiny_hf_model)


@pytest.fixture
def model_copy(tiny_hf_model, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_hf_model, dst)
    return dst
