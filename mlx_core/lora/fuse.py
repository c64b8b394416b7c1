"""Fusing an adapter into the base weights (`loraforge fuse`), dequantizing on the way if asked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_core.lora.formats import load_adapter
from mlx_core.lora.layers import Adapter, AdapterError, projection_parts
from mlx_core.model import Mistral
from mlx_core.weights import load_model, save_model


def fuse_adapter(model: Mistral, adapter: Adapter, dequantize: bool = False) -> None:
    """Merge W += scale * (A @ B).T into every targeted projection slice, in place.

    A quantized projection is de-quantized, merged and re-quantized with its group size and bits;
    with `dequantize` the whole model becomes dense (model.args.quantization None).
    """
    adapter.check_fits(model.args)
    parts = projection_parts(model.args)
    by_module: dict[tuple[int, str], list[tuple[int, int, mx.array]]] = {}
    for (layer, target), (a, b) in adapter.weights.items():
        p = parts[target]
        delta = adapter.scale * (a.astype(mx.float32) @ b.astype(mx.float32)).T  # (out slice, in)
        by_module.setdefault((layer, p.module), []).append((p.start, p.end, delta))
    for (layer, module), deltas in by_module.items():
        owner, attr = module.split(".")
        parent = getattr(model.model.layers[layer], owner)
        setattr(
            parent,
            attr,
            _merged(getattr(parent, attr), deltas, dequantize, f"layer {layer} {module}"),
        )
    if dequantize:
        dequantize_model(model)
    mx.eval(model.parameters())


def _merged(
    base: nn.Module, deltas: list[tuple[int, int, mx.array]], dequantize: bool, where: str
) -> nn.Module:
    quantized = isinstance(base, nn.QuantizedLinear)
    if quantized:
        w = _dequantized_weight(base)
    elif isinstance(base, nn.Linear):
        w = base.weight
    else:
        raise AdapterError(
            f"{where} is a {type(base).__name__}, not a plain projection: fuse into a model "
            "loaded with load_model, without apply_lora or adapter slots"
        )
    merged = w.astype(mx.float32)  # add in fp32 so small updates survive bf16 weights
    for start, end, delta in deltas:
        merged[start:end] = merged[start:end] + delta
    out, inp = w.shape
    dense = nn.Linear(inp, out, bias="bias" in base)
    dense.weight = merged.astype(w.dtype)
    if "bias" in base:
        dense.bias = base.bias
    if quantized and not dequantize:
        return nn.QuantizedLinear.from_linear(dense, base.group_size, base.bits, mode=base.mode)
    return dense


def _dequantized_weight(m: nn.Module) -> mx.array:
    return mx.dequantize(
        m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode
    )


def dequantize_model(model: Mistral) -> None:
    """Replace every quantized linear/embedding with its dense equivalent; args say unquantized."""
    dense = []
    for name, m in model.named_modules():
        d: nn.Linear | nn.Embedding
        if isinstance(m, nn.QuantizedLinear):
            w = _dequantized_weight(m)
            d = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            if "bias" in m:
                d.bias = m.bias
        elif isinstance(m, nn.QuantizedEmbedding):
            w = _dequantized_weight(m)
            d = nn.Embedding(*w.shape)
        else:
            continue
        d.weight = w
        dense.append((name, d))
    if dense:
        model.update_modules(tree_unflatten(dense))
    model.args = replace(model.args, quantization=None)


def fuse(
    model_path: str | Path, adapter_path: str | Path, out: str | Path, dequantize: bool = False
) -> Path:
    """`loraforge fuse`: the base model with the adapter merged in, saved as a model folder."""
    if Path(out).expanduser().resolve() == Path(model_path).expanduser().resolve():
        raise AdapterError(
            f"--save-path {out} is the base model's folder: choose a new folder so the base stays intact"
        )
    loaded = load_model(model_path)
    adapter = load_adapter(adapter_path, loaded.args)
    adapter.check_fits(loaded.args)
    fuse_adapter(loaded.model, adapter, dequantize=dequantize)
    return save_model(out, loaded.model, loaded.tokenizer)
