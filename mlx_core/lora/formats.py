"""Adapter files: read the LoRA formats users bring, write ours, and fuse an adapter into a model.

Every format becomes one `Adapter` (HF target names, A (in, r), B (r, out), HF RoPE row order):
- ours: adapter_config.json {"format": "loraforge"} + adapters.safetensors, or X.npz + X.json;
  the folder is also a valid mlx-lm adapter folder (same tensor names, `lora_parameters`);
- mlx-lm: adapter_config.json with `lora_parameters` + adapters.safetensors;
- Hugging Face PEFT: adapter_config.json + adapter_model.safetensors (A/B stored transposed);
- mlx-examples' Dec-2023 lora.py `adapters.npz`: Mistral names, scale 2, and q/k output rows in
  Mistral's interleaved RoPE order, which only the base model's head counts can undo.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx

from mlx_core.config import ModelArgs
from mlx_core.lora.layers import TARGETS, Adapter, AdapterError
from mlx_core.weights import unpermute_rope_rows

ACCEPTED = (
    'accepted: a loraforge adapter folder (adapter_config.json with "format": "loraforge" + '
    "adapters.safetensors), an mlx-lm adapter folder (adapter_config.json with lora_parameters + "
    "adapters.safetensors), a Hugging Face PEFT LoRA folder (adapter_config.json + "
    "adapter_model.safetensors), mlx-examples' lora.py adapters.npz, or loraforge's X.npz + X.json"
)
_OWNER = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
# mlx-lm and ours: "model.layers.3.self_attn.q_proj.lora_a"; PEFT: "...q_proj.lora_A.weight".
_HF_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([ab])$")
_PEFT_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_SEED_NAME = re.compile(r"^layers\.(\d+)\.(?:attention|feed_forward)\.(w[qkvo123])\.lora_([ab])$")
_SEED_TARGETS = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}
_SEED_SCALE = 2.0  # mlx-examples' LoRALinear hard-coded lora_scale = 2
_MLX_LM_SCALE = 20.0  # mlx-lm's default lora_parameters.scale
# PEFT options that change what the adapter computes; none has a plain A/B equivalent.
_PEFT_VARIANTS = {
    "use_dora": "DoRA",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters",
    "trainable_token_indices": "trainable tokens",
    "lora_bias": "a LoRA bias",
}

Weights = dict[tuple[int, str], tuple[mx.array, mx.array]]


class AdapterFormatError(AdapterError):
    """An adapter file or folder that cannot be read; the message names the file and the fix."""


# -- writing ------------------------------------------------------------------------------------
def tensor_name(layer: int, target: str, which: str) -> str:
    """Our (and mlx-lm's) tensor name, e.g. model.layers.0.self_attn.q_proj.lora_a."""
    return f"model.layers.{layer}.{_OWNER[target]}.{target}.lora_{which}"


def _tensors(adapter: Adapter) -> dict[str, mx.array]:
    out = {}
    for (layer, target), (a, b) in sorted(adapter.weights.items()):
        out[tensor_name(layer, target, "a")] = a
        out[tensor_name(layer, target, "b")] = b
    return out


def adapter_config(adapter: Adapter, base_model: str | None = None) -> dict:
    """The adapter_config.json we write; `lora_parameters` and `num_layers` are for mlx-lm."""
    layers = sorted(adapter.layers) or [0]
    # mlx-lm wraps the *last* num_layers layers of the model, so it needs the model's depth;
    # layers in that range without tensors keep mlx-lm's zero B, i.e. no change.
    n_layers = _fingerprint_layers(adapter.fingerprint) or layers[-1] + 1
    return {
        "format": "loraforge",
        "fine_tune_type": "lora",
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "scale": adapter.scale,
        "dropout": adapter.dropout,
        "targets": list(adapter.targets),
        "layers": list(adapter.layers),
        "num_layers": n_layers - layers[0],
        "base_model": base_model or adapter.base_model,
        "fingerprint": adapter.fingerprint,
        "lora_parameters": {
            "rank": adapter.rank,
            "scale": adapter.scale,
            "dropout": adapter.dropout,
            "keys": [f"{_OWNER[t]}.{t}" for t in adapter.targets],
        },
    }


def _fingerprint_layers(fingerprint: str | None) -> int | None:
    # ModelArgs.shape_fingerprint(): "mistral-{dim}-{n_layers}-...".
    parts = (fingerprint or "").split("-")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None


def save_adapter(folder: Path, adapter: Adapter, base_model: str | None = None) -> Path:
    """Write `folder/adapters.safetensors` + `folder/adapter_config.json`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(folder / "adapters.safetensors"), _tensors(adapter), metadata={"format": "mlx"}
    )
    (folder / "adapter_config.json").write_text(
        json.dumps(adapter_config(adapter, base_model), indent=2)
    )
    return folder


def save_adapter_npz(path: Path, adapter: Adapter, base_model: str | None = None) -> Path:
    """Write X.npz (weights) and X.json (config) for `--adapter-file X.npz`; returns X.npz."""
    path = Path(path)
    if path.suffix != ".npz":
        raise AdapterFormatError(
            f"{path}: an adapter file must end in .npz; pass e.g. {path.stem}.npz"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.savez(str(path), **_tensors(adapter))
    path.with_suffix(".json").write_text(json.dumps(adapter_config(adapter, base_model), indent=2))
    return path


# -- reading ------------------------------------------------------------------------------------
def load_adapter(path: str | Path, args: ModelArgs | None = None) -> Adapter:
    """Read an adapter in any accepted format (detected from its files).

    `args` (the base model's) is needed only for mlx-examples npz files that adapt wq/wk, whose
    rows must be reordered per attention head.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterFormatError(
            f"{p}: no such adapter file or folder; pass the folder holding "
            "adapter_config.json or the adapter's .npz file"
        )
    if (
        p.is_file()
        and p.suffix in (".json", ".safetensors", ".bin")
        and (p.parent / "adapter_config.json").exists()
    ):
        p = p.parent  # a file inside an adapter folder stands for the folder
    elif p.suffix == ".json" and p.with_suffix(".npz").exists():
        p = p.with_suffix(".npz")  # the config half of an X.npz + X.json pair
    if p.is_dir():
        config = p / "adapter_config.json"
        if config.exists():
            cfg = _read_json(config)
            if cfg.get("format") == "loraforge":
                return _tagged(_load_ours(p / "adapters.safetensors", cfg), "loraforge")
            if "lora_parameters" in cfg or "fine_tune_type" in cfg:
                return _tagged(_load_mlx_lm(p, cfg), "mlx-lm")
            if "peft_type" in cfg or "lora_alpha" in cfg:
                return _tagged(_load_peft(p, cfg), "peft")
            raise AdapterFormatError(
                f"{config}: keys {sorted(cfg)[:8]} match no known adapter config; {ACCEPTED}"
            )
        if not (p / "adapters.npz").exists():
            found = sorted(f.name for f in p.iterdir())[:10]
            raise AdapterFormatError(
                f"{p}: no adapter_config.json or adapters.npz (found {found or 'nothing'}); {ACCEPTED}"
            )
        p = p / "adapters.npz"
    if p.suffix == ".npz":
        side = p.with_suffix(".json")
        if side.exists() and _read_json(side).get("format") == "loraforge":
            return _tagged(_load_ours(p, _read_json(side)), "loraforge")
        return _tagged(_load_seed(p, args), "mlx-examples-npz")
    raise AdapterFormatError(f"{p}: not an adapter file; {ACCEPTED}")


def _tagged(adapter: Adapter, source_format: str) -> Adapter:
    adapter.source_format = source_format
    return adapter


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterFormatError(
            f"{path}: cannot read it as JSON ({e}); re-save the adapter"
        ) from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object; re-save the adapter")
    return cfg


def _read_tensors(path: Path) -> dict[str, mx.array]:
    if not path.exists():
        raise AdapterFormatError(
            f"{path} is missing: copy the adapter's weights file beside its config"
        )
    try:
        tensors = mx.load(str(path))
    except Exception as e:
        raise AdapterFormatError(
            f"{path}: not a readable weights file ({e}); re-save or re-download it"
        ) from e
    if not isinstance(tensors, dict):  # a .npy file: one unnamed array
        raise AdapterFormatError(
            f"{path}: holds one unnamed array, not named LoRA tensors; re-save the adapter"
        )
    return tensors


def _pairs(
    tensors: dict[str, mx.array],
    pattern: re.Pattern,
    source: Path,
    targets: dict[str, str] | None = None,
    transpose: bool = False,
) -> dict[tuple[int, str], tuple[mx.array, mx.array]]:
    """Group tensors into (layer, target) -> (A, B) by name; anything else is an error."""
    found: dict[tuple[int, str], dict[str, mx.array]] = {}
    for name, w in tensors.items():
        m = pattern.search(name)
        target = m and (targets[m[2]] if targets else m[2])
        if not m or target not in TARGETS:
            raise AdapterFormatError(
                f"{source}: tensor {name!r} is not a LoRA A/B of one of {', '.join(TARGETS)} "
                "(only LoRA on attention/MLP projections can be loaded)"
            )
        found.setdefault((int(m[1]), target), {})[m[3].lower()] = w.T if transpose else w
    out = {}
    for key, ab in found.items():
        if set(ab) != {"a", "b"} or ab["a"].shape[1] != ab["b"].shape[0]:
            raise AdapterFormatError(
                f"{source}: layer {key[0]} {key[1]} lacks a matching A/B pair; "
                "the file is incomplete, re-save the adapter"
            )
        out[key] = (ab["a"], ab["b"])
    if not out:
        raise AdapterFormatError(f"{source}: holds no LoRA tensors; {ACCEPTED}")
    return out


def _assemble(weights: Weights, scale: float, **meta) -> Adapter:
    """An Adapter over all tensors; smaller ranks are zero-padded (exact) to the largest."""
    rank = max(a.shape[1] for a, _ in weights.values())
    for key, (a, b) in weights.items():
        if a.shape[1] < rank:
            pad = rank - a.shape[1]
            weights[key] = (mx.pad(a, [(0, 0), (0, pad)]), mx.pad(b, [(0, pad), (0, 0)]))
    targets = tuple(t for t in TARGETS if any(k[1] == t for k in weights))
    layers = tuple(sorted({k[0] for k in weights}))
    return Adapter(rank, float(scale), targets, layers, weights, **meta)


def _load_ours(path: Path, cfg: dict) -> Adapter:
    if not isinstance(cfg.get("scale"), int | float):
        raise AdapterFormatError(
            f'{path}: its config has no numeric "scale"; re-save the adapter with loraforge'
        )
    weights = _pairs(_read_tensors(path), _HF_NAME, path)
    adapter = _assemble(
        weights,
        cfg["scale"],
        alpha=cfg.get("alpha"),
        dropout=float(cfg.get("dropout", 0.0)),
        base_model=cfg.get("base_model"),
        fingerprint=cfg.get("fingerprint"),
    )
    # Keep the recorded targets/layers: they say what was trained, even where B is all zero.
    adapter.targets = tuple(cfg.get("targets") or adapter.targets)
    adapter.layers = tuple(cfg.get("layers") or adapter.layers)
    return adapter


def _load_mlx_lm(folder: Path, cfg: dict) -> Adapter:
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterFormatError(
            f"{folder}: an mlx-lm {kind!r} fine-tune, not a LoRA adapter; merge it with "
            f"`mlx_lm.fuse --adapter-path {folder}` and serve the fused model"
        )
    params = cfg.get("lora_parameters") or {}
    weights = _pairs(
        _read_tensors(folder / "adapters.safetensors"), _HF_NAME, folder / "adapters.safetensors"
    )
    return _assemble(
        weights,
        params.get("scale", _MLX_LM_SCALE),
        dropout=float(params.get("dropout", 0.0)),
        base_model=cfg.get("model"),
    )


def _load_peft(folder: Path, cfg: dict) -> Adapter:
    config = folder / "adapter_config.json"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(
            f"{config}: a PEFT {cfg['peft_type']} adapter; only LoRA adapters can be loaded"
        )
    for key, name in _PEFT_VARIANTS.items():
        if cfg.get(key):
            raise AdapterFormatError(
                f"{config}: uses {name} ({key}), which loraforge cannot serve; merge it "
                "into the base with PEFT's merge_and_unload() and serve the merged model"
            )
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        what = (
            "trains biases (bias != 'none')"
            if cfg.get("bias", "none") != "none"
            else "has modules_to_save"
        )
        raise AdapterFormatError(
            f"{config}: {what}, which a LoRA adapter cannot carry here; retrain with "
            "bias='none' and no modules_to_save, or merge_and_unload() and serve the merged model"
        )
    path = folder / "adapter_model.safetensors"
    if not path.exists() and (folder / "adapter_model.bin").exists():
        raise AdapterFormatError(
            f"{folder}: only adapter_model.bin (pickle); re-save it with "
            "model.save_pretrained(path, safe_serialization=True) to get adapter_model.safetensors"
        )
    weights = _pairs(_read_tensors(path), _PEFT_NAME, path, transpose=True)
    r, alpha, rslora = (
        int(cfg.get("r", 8)),
        float(cfg.get("lora_alpha", 8)),
        bool(cfg.get("use_rslora")),
    )

    def scale_of(rank: int, a: float) -> float:
        return a / math.sqrt(rank) if rslora else a / rank

    scale = scale_of(r, alpha)
    # rank_pattern shows in the tensors' shapes; per-module alphas (or ranks) change the scale,
    # which we fold into B so the adapter keeps one scale.
    patterns = cfg.get("alpha_pattern") or {}
    for (layer, target), (a, b) in weights.items():
        module = f"model.layers.{layer}.{_OWNER[target]}.{target}"
        matched = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        own = scale_of(a.shape[1], float(patterns[matched]) if matched else alpha)
        if own != scale:
            weights[(layer, target)] = (a, b * (own / scale))
    return _assemble(
        weights,
        scale,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        base_model=cfg.get("base_model_name_or_path"),
    )


def _load_seed(path: Path, args: ModelArgs | None) -> Adapter:
    tensors = _read_tensors(path)
    if not all(_SEED_NAME.match(n) for n in tensors):
        names = sorted(tensors)[:4]
        hint = (
            f" (Hugging Face-style names: put the config it was saved with beside it as {path.stem}.json)"
            if names and all(_HF_NAME.search(n) for n in names)
            else ""
        )
        raise AdapterFormatError(
            f"{path}: tensor names {names} are not mlx-examples' lora.py layout{hint}; {ACCEPTED}"
        )
    weights = _pairs(tensors, _SEED_NAME, path, targets=_SEED_TARGETS)
    for (layer, target), (a, b) in weights.items():
        if target not in ("q_proj", "k_proj"):
            continue
        if args is None:
            raise AdapterFormatError(
                f"{path}: adapts wq/wk, whose rows follow Mistral's original RoPE order; "
                "load it with the base model's args (`--model PATH` on the command line)"
            )
        heads = args.n_heads if target == "q_proj" else args.n_kv_heads
        if b.shape[1] != heads * args.head_dim:
            raise AdapterError(
                f"{path}: layer {layer} {target} has {b.shape[1]} outputs, the base model has "
                f"{heads * args.head_dim}: it was trained on a different base model"
            )
        weights[(layer, target)] = (a, unpermute_rope_rows(b.T, heads).T)
    return _assemble(weights, _SEED_SCALE)


# -- fusing -------------------------------------------------------------------------------------
