"""Read and write model weights: Hugging Face safetensors (single or sharded), Mistral's original
`consolidated.00.pth`, the folder mlx-examples' Dec-2023 `convert.py` wrote (`weights.npz`), and
our own format (HF names + config.json, optionally quantized the way mlx-lm stores it).

Every format is turned into one layout at load: Hugging Face's tensor names and its RoPE row order
for q/k (Mistral's files interleave the two halves of each head; `unpermute_rope_rows` undoes it),
then q/k/v and gate/up are fused for the model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_core.cache import kv_bytes_per_token
from mlx_core.config import ModelArgs, Quantization, load_config
from mlx_core.errors import LoraforgeError
from mlx_core.model import Mistral
from mlx_core.tokenizer import Tokenizer

DTYPES = {
    "bf16": mx.bfloat16,
    "f16": mx.float16,
    "f32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
    "float32": mx.float32,
}
_SHARD_BYTES = 4 << 30
_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "legacy": True,
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


class WeightsError(LoraforgeError, ValueError):
    """A model folder whose weights cannot be loaded; the message names the file and the fix."""


@dataclass
class LoadedModel:
    model: Mistral
    args: ModelArgs
    tokenizer: Tokenizer
    path: Path
    source_format: str  # "hf", "mistral-pth", "mlx-examples-npz"

    @property
    def name(self) -> str:
        return self.path.name

    def kv_tokens_in(self, budget_bytes: int) -> int:
        """How many tokens' keys and values fit in `budget_bytes` of KV cache (rounded down)."""
        # The cache holds activations, in the norms' dtype: quantized linears still compute in
        # float, so the projection weights' dtype would say nothing about it.
        dtype_bytes = self.model.model.norm.weight.dtype.size
        return budget_bytes // kv_bytes_per_token(self.args, dtype_bytes)


# -- the one layout -----------------------------------------------------------------------------
def unpermute_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """Mistral's q/k rows (pairs interleaved per head) -> Hugging Face's (halves per head).

    Works for a weight (out, in), a quantized weight/scales/biases (out, *) and a LoRA B (r, out)
    transposed to (out, r): only the row order changes.
    """
    out = w.shape[0]
    head = out // n_heads
    return w.reshape(n_heads, head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(out, *w.shape[1:])


_MISTRAL_NAMES = [
    (r"^tok_embeddings\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (r"^output\.", "lm_head."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"model.layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"model.layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"model.layers.\1.mlp.up_proj."),
    (r"^layers\.(\d+)\.attention_norm\.", r"model.layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"model.layers.\1.post_attention_layernorm."),
]


def mistral_name_to_hf(name: str) -> str:
    for pattern, repl in _MISTRAL_NAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def mistral_to_hf(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    out = {}
    for name, w in weights.items():
        hf = mistral_name_to_hf(name)
        if re.search(r"self_attn\.q_proj\.", hf):
            w = unpermute_rope_rows(w, args.n_heads)
        elif re.search(r"self_attn\.k_proj\.", hf):
            w = unpermute_rope_rows(w, args.n_kv_heads)
        out[hf] = w
    return out


_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(weights: dict[str, mx.array], n_layers: int) -> dict[str, mx.array]:
    """HF names -> model names: concatenate q/k/v and gate/up rows (weights, scales, biases)."""
    for i in range(n_layers):
        for fused, parts in _FUSED.items():
            for suffix in ("weight", "scales", "biases"):
                keys = [f"model.layers.{i}.{p}.{suffix}" for p in parts]
                if all(k in weights for k in keys):
                    weights[f"model.layers.{i}.{fused}.{suffix}"] = mx.concatenate(
                        [weights.pop(k) for k in keys], axis=0
                    )
    return weights


def split_projections(weights: dict[str, mx.array], args: ModelArgs) -> dict[str, mx.array]:
    """Model names -> HF names (the inverse of `fuse_projections`)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    sizes = {"self_attn.qkv_proj": [q, q + kv], "mlp.gate_up_proj": [args.hidden_dim]}
    out = {}
    for name, w in weights.items():
        m = re.match(
            r"^(model\.layers\.\d+)\.(self_attn\.qkv_proj|mlp\.gate_up_proj)\.(\w+)$", name
        )
        if not m:
            out[name] = w
            continue
        prefix, fused, suffix = m.groups()
        for part, piece in zip(_FUSED[fused], mx.split(w, sizes[fused], axis=0)):
            out[f"{prefix}.{part}.{suffix}"] = piece
    return out


# -- reading ------------------------------------------------------------------------------------
def _read_safetensors(folder: Path) -> dict[str, mx.array]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise WeightsError(
                f"{index} lists {len(files)} shards but {', '.join(missing)} is missing: "
                "finish the download (all model-*.safetensors files) and try again"
            )
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(load_tensors(folder / f))
        except Exception as e:
            raise WeightsError(
                f"{folder / f}: not a readable safetensors file ({e}); re-download it"
            ) from e
    return weights


def _read_pth(folder: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError as e:
        raise WeightsError(
            f"{folder} holds Mistral's consolidated.*.pth checkpoint, which needs torch to read: "
            "pip install 'loraforge[convert]' (then `loraforge convert` once to get a folder that "
            "loads without torch)"
        ) from e
    shards = sorted(folder.glob("consolidated.*.pth"))
    if len(shards) > 1:
        raise WeightsError(
            f"{folder}: {len(shards)} consolidated shards; only single-file (7B) checkpoints are supported"
        )
    try:
        # mmap keeps the file on disk; tensors are copied into MLX one at a time.
        state = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{shards[0]}: torch cannot read it ({e}); re-download the checkpoint"
        ) from e
    out = {}
    for name in list(state):
        t = state.pop(name)
        if t.dtype == torch.bfloat16:
            out[name] = mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
        else:
            out[name] = mx.array(t.numpy())
    return out


def load_tensors(path: str | Path) -> dict[str, mx.array]:
    """The named tensors of a .safetensors or .npz file (lazy: read when evaluated)."""
    loaded = mx.load(str(path))
    if not isinstance(loaded, dict):  # a .npy holds one unnamed array
        raise ValueError(f"{path} holds one unnamed array, not named tensors")
    return loaded


def read_checkpoint(folder: Path, args: ModelArgs) -> tuple[dict[str, mx.array], str]:
    """All tensors of a model folder under HF names and layout, plus the format's name."""
    if (folder / "model.safetensors.index.json").exists() or any(folder.glob("*.safetensors")):
        return _read_safetensors(folder), "hf"
    if any(folder.glob("consolidated.*.pth")):
        return mistral_to_hf(_read_pth(folder), args), "mistral-pth"
    if (folder / "weights.npz").exists():
        return mistral_to_hf(load_tensors(folder / "weights.npz"), args), "mlx-examples-npz"
    raise WeightsError(
        f"{folder}: no weights found (model*.safetensors, consolidated.00.pth or weights.npz); "
        "point --model at a complete model folder"
    )


def _open_folder(path: str | Path) -> tuple[Path, ModelArgs, Tokenizer]:
    """A model folder's path, config and tokenizer: what every load reads before the weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise WeightsError(
            f"{folder}: no such model folder; pass --model PATH to a model directory"
        )
    return folder, load_config(folder), Tokenizer.from_folder(folder)


def check_model_folder(path: str | Path) -> ModelArgs:
    """Cheap checks before a slow load: the folder, its config, tokenizer and weight files.
    Raises the same errors `load_model` would, naming the file and the fix."""
    folder, args, _ = _open_folder(path)
    if not any(any(folder.glob(p)) for p in ("*.safetensors", "consolidated.*.pth", "weights.npz")):
        raise WeightsError(
            f"{folder}: no weights found (model*.safetensors, consolidated.00.pth or weights.npz); "
            "point --model at a complete model folder"
        )
    return args


def load_model(
    path: str | Path, dtype: str | None = None, quantize: Quantization | None = None
) -> LoadedModel:
    """Load any supported model folder. `dtype` casts float weights; `quantize` quantizes a
    dense model at load (QLoRA); an already quantized checkpoint loads as it is."""
    folder, args, tokenizer = _open_folder(path)
    weights, fmt = read_checkpoint(folder, args)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    weights = fuse_projections(weights, args.n_layers)
    model = Mistral(args)
    if args.quantization:
        q = args.quantization
        nn.quantize(
            model, q.group_size, q.bits, class_predicate=lambda p, m: f"{p}.scales" in weights
        )
    _check_names(model, weights, folder)
    cast = DTYPES[dtype] if dtype else None
    requantize = quantize if quantize is not None and not args.quantization else None
    if requantize is not None:
        # Quantize tensor by tensor as they are read: QLoRA on a 7B model never holds the dense
        # weights (14 GB) beside the quantized ones, only one dense tensor at a time.
        nn.quantize(model, requantize.group_size, requantize.bits)
        args = _with_quantization(args, requantize)
        model.args = args
        flat = tree_flatten(model.parameters())
        assert isinstance(flat, list)  # annotated list | dict; without `destination` it is a list
        quantized = {n[: -len(".scales")] for n, _ in flat if n.endswith(".scales")}
    # Evaluate tensor by tensor so no source array outlives its use (a 7B load stays ~1x in RAM).
    for name in list(weights):
        w = weights.pop(name)
        if (
            cast is not None
            and mx.issubdtype(w.dtype, mx.floating)
            and not name.endswith(("scales", "biases"))
        ):
            w = w.astype(cast)
        prefix = name[: -len(".weight")]
        if requantize is not None and name.endswith(".weight") and prefix in quantized:
            wq, scales, biases = mx.quantize(w, requantize.group_size, requantize.bits)
            parts = [(name, wq), (f"{prefix}.scales", scales), (f"{prefix}.biases", biases)]
        else:
            parts = [(name, w)]
        mx.eval([a for _, a in parts])
        del w
        model.load_weights(parts, strict=False)
    mx.eval(model.parameters())
    model.eval()
    return LoadedModel(model, args, tokenizer, folder, fmt)


def _with_quantization(args: ModelArgs, q: Quantization) -> ModelArgs:
    from dataclasses import replace

    return replace(args, quantization=q)


def _check_names(model: Mistral, weights: dict[str, mx.array], folder: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(
            f"{folder}: the checkpoint does not match its config: {'; '.join(parts)}; "
            "is the download complete and config.json from the same model?"
        )
    for name, w in weights.items():
        if tuple(w.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{folder}: tensor {name} has shape {tuple(w.shape)} but the config implies "
                f"{tuple(expected[name].shape)}; config.json and the weights disagree"
            )


# -- writing ------------------------------------------------------------------------------------
def save_model(folder: str | Path, model: Mistral, tokenizer: Tokenizer) -> Path:
    """Write our format: config.json + model*.safetensors (HF names) + tokenizer.model."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    weights = split_projections(dict(tree_flatten(model.parameters())), model.args)
    shards = list(_shards(weights))
    index: dict[str, str] = {}
    for n, shard in enumerate(shards, 1):
        fname = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        )
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "mlx"})
        index.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(w.nbytes for w in weights.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
        )
    (out / "config.json").write_text(json.dumps(model.args.to_hf(), indent=2))
    # Lets transformers (and so mlx-lm) read the folder's tokenizer.model as Mistral's tokenizer.
    (out / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2))
    if tokenizer.path.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    return out


def _shards(weights: dict[str, mx.array]) -> Iterator[dict[str, mx.array]]:
    shard: dict[str, mx.array] = {}
    size = 0
    for name, w in weights.items():
        if shard and size + w.nbytes > _SHARD_BYTES:
            yield shard
            shard, size = {}, 0
        shard[name] = w
        size += w.nbytes
    if shard:
        yield shard


def quantize_model(model: Mistral, q: Quantization) -> None:
    nn.quantize(model, q.group_size, q.bits)
    model.args = _with_quantization(model.args, q)


def convert(
    src: str | Path, dst: str | Path, dtype: str | None = None, quantize: Quantization | None = None
) -> Path:
    """`loraforge convert`: any supported folder -> our format, optionally cast and quantized."""
    loaded = load_model(src, dtype=dtype)
    if quantize:
        if loaded.args.quantization:
            raise WeightsError(f"{src} is already quantized; convert from the unquantized model")
        quantize_model(loaded.model, quantize)
    return save_model(dst, loaded.model, loaded.tokenizer)
