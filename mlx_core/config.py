"""Model hyper-parameters from a Hugging Face `config.json` or Mistral's `params.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_core.errors import LoraforgeError

# Architectures that are the same network as Mistral-7B (Llama differs only by having no window).
_HF_ARCHITECTURES = {"MistralForCausalLM", "LlamaForCausalLM"}
_HF_MODEL_TYPES = {"mistral", "llama"}


class ConfigError(LoraforgeError, ValueError):
    """A model folder whose configuration cannot be read; the message says which file and why."""


@dataclass(frozen=True)
class Quantization:
    group_size: int = 64
    bits: int = 4


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    quantization: Quantization | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}: "
                "check the model's config.json"
            )

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings

    def shape_fingerprint(self) -> str:
        """A short id of the shapes an adapter depends on (not of the weights' values)."""
        parts = (
            self.dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.hidden_dim,
            self.vocab_size,
        )
        return "mistral-" + "-".join(str(p) for p in parts)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> ModelArgs:
        archs = set(cfg.get("architectures") or [])
        model_type = cfg.get("model_type")
        if not (archs & _HF_ARCHITECTURES or model_type in _HF_MODEL_TYPES):
            raise ConfigError(
                f"{source}: architecture {sorted(archs) or model_type!r} is not supported; "
                "loraforge serves Mistral-architecture models (MistralForCausalLM)"
            )
        try:
            quant = cfg.get("quantization")
            return cls(
                dim=int(cfg["hidden_size"]),
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=int(cfg["num_attention_heads"]),
                n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                hidden_dim=int(cfg["intermediate_size"]),
                vocab_size=int(cfg["vocab_size"]),
                head_dim=int(cfg.get("head_dim") or 0),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=_hf_rope_theta(cfg, source),
                sliding_window=cfg.get("sliding_window"),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                quantization=Quantization(int(quant["group_size"]), int(quant["bits"]))
                if quant
                else None,
            )
        except KeyError as e:
            raise ConfigError(
                f"{source}: missing key {e.args[0]!r}; is this a model config?"
            ) from e

    @classmethod
    def from_mistral_params(cls, p: dict, source: str = "params.json") -> ModelArgs:
        try:
            quant = p.get("quantization")
            return cls(
                dim=int(p["dim"]),
                n_layers=int(p["n_layers"]),
                n_heads=int(p["n_heads"]),
                n_kv_heads=int(p.get("n_kv_heads") or p["n_heads"]),
                hidden_dim=int(p["hidden_dim"]),
                vocab_size=int(p["vocab_size"]),
                head_dim=int(p.get("head_dim") or 0),
                norm_eps=float(p.get("norm_eps", 1e-5)),
                rope_theta=float(p.get("rope_theta", 10000.0)),
                sliding_window=p.get("sliding_window"),
                # Mistral-7B-v0.1's params.json has no context length; its HF config says 32768.
                max_position_embeddings=int(p.get("max_seq_len", 32768)),
                quantization=Quantization(int(quant["group_size"]), int(quant["bits"]))
                if quant
                else None,
            )
        except KeyError as e:
            raise ConfigError(
                f"{source}: missing key {e.args[0]!r}; is this Mistral's params.json?"
            ) from e

    def to_hf(self) -> dict:
        """The config.json we write: Hugging Face's names, readable by transformers and mlx-lm."""
        cfg = {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if self.quantization:
            cfg["quantization"] = asdict(self.quantization)
        return cfg


def _hf_rope_theta(cfg: dict, source: str) -> float:
    # transformers 5 writes {"rope_parameters": {"rope_theta": ..., "rope_type": ...}}; older
    # configs have a top-level rope_theta (and maybe rope_scaling).
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind != "default":
        raise ConfigError(
            f"{source}: RoPE scaling {kind!r} is not supported; use a model without rope scaling"
        )
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def load_config(folder: Path) -> ModelArgs:
    """Read config.json (HF or ours) or params.json (Mistral) from a model folder."""
    hf, mistral = folder / "config.json", folder / "params.json"
    if hf.exists():
        return ModelArgs.from_hf(_read_json(hf), str(hf))
    if mistral.exists():
        return ModelArgs.from_mistral_params(_read_json(mistral), str(mistral))
    raise ConfigError(
        f"{folder}: no config.json or params.json; point --model at a Hugging Face model folder, "
        "Mistral's original download (params.json + consolidated.00.pth) or a `loraforge convert` output"
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path}: cannot read it as JSON ({e}); re-download or fix the file"
        ) from e
