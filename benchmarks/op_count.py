"""Primitives in one batch-1 decode step's graph (model + greedy sample), ours and mlx-lm's.

    python -m benchmarks.op_count [--quantize 4] [--layers 32]

Runs on any backend. Each `mx.fast` call (RMSNorm, RoPE, attention) counts as one primitive, as
on CUDA; the CPU expands them into their fallbacks, which are subtracted here. "views" launch no
GPU work (reshape, transpose, slice, split, ...); "kernels" do. Prints JSON. Shapes do not change
the count, so the model is small; the custom 4-bit kernel is CUDA-only and not counted.
"""

from __future__ import annotations

import argparse
import collections
import io
import re
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from benchmarks.common import report

VIEWS = {
    "Reshape", "Transpose", "Slice", "Split", "Flatten", "Unflatten", "Squeeze", "ExpandDims",
    "Broadcast", "AsStrided", "StopGradient", "Depends",
}  # fmt: skip
FAST = ("rms_norm", "rope", "scaled_dot_product_attention")


def primitives(*arrays: mx.array) -> collections.Counter:
    buf = io.StringIO()
    mx.export_to_dot(buf, *arrays)
    return collections.Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', buf.getvalue()))


def count_step(step: Callable[[], mx.array]) -> dict:
    """Build one step with the `mx.fast` calls recorded, then count its graph."""
    calls: list[tuple[str, list[mx.array], mx.array]] = []
    originals = {name: getattr(mx.fast, name) for name in FAST}

    def recording(name: str) -> Callable:
        def call(*args, **kwargs):
            out = originals[name](*args, **kwargs)
            ins = [a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)]
            calls.append((name, ins, out))
            return out

        return call

    for name in FAST:
        setattr(mx.fast, name, recording(name))
    try:
        out = step()
    finally:
        for name, fn in originals.items():
            setattr(mx.fast, name, fn)
    counts = primitives(out)
    for name, ins, res in calls:  # replace each call's fallback graph by one primitive
        added = primitives(res, *ins)
        added.subtract(primitives(*ins))
        counts.subtract(added)
        counts[f"fast.{name}"] += 1
    counts = +counts
    views = sum(n for k, n in counts.items() if k in VIEWS)
    total = sum(counts.values())
    return {"primitives": total, "views": views, "kernels": total - views, "by_type": dict(counts)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    ns = p.parse_args()
    dim, heads, kv, hidden, vocab = 256, 8, 2, 512, 1000
    prompt = mx.array([[1, 2, 3, 4, 5]])

    def prepare(model: nn.Module) -> None:
        model.set_dtype(mx.bfloat16)
        if ns.quantize:
            nn.quantize(model, 64, ns.quantize)
        mx.eval(model.parameters())

    from mlx_core.config import ModelArgs
    from mlx_core.model import Mistral
    from mlx_core.sampling import RowSampler, SamplingParams, sample

    ours = Mistral(
        ModelArgs(
            dim=dim, n_layers=ns.layers, n_heads=heads, n_kv_heads=kv, hidden_dim=hidden,
            vocab_size=vocab, sliding_window=4096, max_position_embeddings=32768,
        )
    )  # fmt: skip
    prepare(ours)
    cache = ours.new_cache(1)
    mx.eval(ours(prompt, cache=cache), cache.keys, cache.values)
    greedy = [RowSampler(SamplingParams(temperature=0.0))]
    results = {
        "loraforge": count_step(
            lambda: sample(ours(mx.array([7]).reshape(1, 1), cache=cache)[:, -1, :], greedy).tokens
        )
    }
    try:
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.models.llama import Model
        from mlx_lm.models.llama import ModelArgs as LlamaArgs
    except ImportError:
        pass
    else:
        theirs = Model(
            LlamaArgs(
                model_type="llama", hidden_size=dim, num_hidden_layers=ns.layers,
                intermediate_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                rms_norm_eps=1e-5, vocab_size=vocab, rope_theta=10000.0,
            )
        )  # fmt: skip
        prepare(theirs)
        pc = make_prompt_cache(theirs)
        mx.eval(theirs(prompt, cache=pc), [c.state for c in pc])
        results["mlx_lm"] = count_step(
            lambda: mx.argmax(theirs(mx.array([7]).reshape(1, 1), cache=pc)[:, -1, :], axis=-1)
        )
    report("op_count", {"layers": ns.layers, "quantize": ns.quantize, "batch": 1}, results)


if __name__ == "__main__":
    main()
