"""Shared by the benchmarks: model folders (random weights in real shapes), timing, JSON output."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_core.config import ModelArgs, Quantization
from mlx_core.model import Mistral
from mlx_core.tokenizer import Tokenizer
from mlx_core.weights import save_model

# Mistral-7B-v0.1's shapes: dim, layers, heads, kv heads, hidden, vocab.
SHAPES = {
    "7b": (4096, 32, 32, 8, 14336, 32000),
    "1b": (2048, 16, 16, 8, 5632, 32000),
    "small": (512, 4, 8, 2, 1536, 32000),
    "tiny": (64, 2, 4, 2, 128, 32000),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model folder (HF or loraforge format)")
    p.add_argument(
        "--random", choices=sorted(SHAPES), help="random weights in these shapes instead"
    )
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tokenizer", help="tokenizer.model for --random (default: mistral-common's)")
    p.add_argument(
        "--workdir", default=None, help="where to write the random model (default: temp)"
    )


def default_tokenizer() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


def random_model(
    out: Path, shape: str, dtype: str, quantize: int | None, group_size: int, tokenizer: Path
) -> Path:
    """Write a model with random weights in the given shapes (throughput does not depend on the
    values), in our format, which both loraforge and mlx-lm load."""
    dim, layers, heads, kv, hidden, vocab = SHAPES[shape]
    args = ModelArgs(
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        hidden_dim=hidden,
        vocab_size=vocab,
        sliding_window=4096,
        max_position_embeddings=32768,
    )
    dt = {"bf16": mx.bfloat16, "f16": mx.float16, "f32": mx.float32}[dtype]
    model = Mistral(args)
    mx.random.seed(0)
    # Scaled like a trained model's weights so activations stay finite in bf16.
    model.update(
        tree_map(lambda p: (mx.random.normal(p.shape) * 0.02).astype(dt), model.parameters())
    )
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    if quantize:
        nn.quantize(model, group_size, quantize)
        from dataclasses import replace

        model.args = replace(args, quantization=Quantization(group_size, quantize))
    tok = Tokenizer.from_file(tokenizer)
    return save_model(out, model, tok)


def prepare_model(ns: argparse.Namespace) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if ns.model:
        return Path(ns.model), None
    if not ns.random:
        sys.exit("pass --model PATH or --random SHAPE")
    tok = Path(ns.tokenizer) if ns.tokenizer else default_tokenizer()
    name = f"random-{ns.random}-{ns.dtype}" + (f"-q{ns.quantize}" if ns.quantize else "")
    if ns.workdir:  # kept, so several benchmarks in one session share one random model
        path = Path(ns.workdir) / name
        if not (path / "config.json").exists():
            random_model(path, ns.random, ns.dtype, ns.quantize, ns.group_size, tok)
        return path, None
    tmp = tempfile.TemporaryDirectory()
    path = random_model(Path(tmp.name) / name, ns.random, ns.dtype, ns.quantize, ns.group_size, tok)
    return path, tmp


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
    }
    try:
        info["device_info"] = {
            k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))
        }
    except Exception:
        pass
    return info


def report(name: str, config: dict, results: dict) -> None:
    print(
        json.dumps(
            {
                "benchmark": name,
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
                "machine": machine(),
                "config": config,
                "results": results,
            },
            indent=2,
        )
    )


def free_memory() -> None:
    import gc

    gc.collect()
    mx.clear_cache()


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
