"""Tiny Mistral-architecture checkpoints for tests, written the way real ones are."""

from __future__ import annotations

import shutil
from pathlib import Path

# Small enough for the CPU backend, big enough that every code path runs: two layers, grouped
# query attention (4 heads over 2 KV heads) and a sliding window shorter than test prompts.
TINY = dict(
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    sliding_window=24,
    rope_theta=1000000.0,  # not the default, so the test proves it is read from config.json
    tie_word_embeddings=False,
)


def write_hf_model(out: Path, tokenizer_path: Path, config: dict, seed: int = 0) -> Path:
    """Save a random MistralForCausalLM with transformers (fp32 safetensors + config.json)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**config)).eval()
    # transformers initialises with std 0.02: logits then barely depend on the input. A larger
    # scale makes attention, the window and the cache matter in every comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15 if "embed" not in name else 1.0)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return out


def hf_reference(model_dir: Path):
    """The same checkpoint loaded by transformers (eager attention, fp32)."""
    from transformers import MistralForCausalLM

    return MistralForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def hf_state_dict_to_mistral_pth(model_dir: Path, out: Path) -> Path:
    """Write the checkpoint as Mistral's original `consolidated.00.pth` + `params.json`."""
    import json

    import torch

    from mlx_core.config import load_config

    args = load_config(model_dir)
    n_heads, n_kv, head_dim = args.n_heads, args.n_kv_heads, args.head_dim

    def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
        # HF halves-per-head rows -> Mistral's interleaved pairs (the inverse of HF's permute).
        return w.view(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)

    sd = hf_reference(model_dir).state_dict()
    state = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        state[f"layers.{i}.attention.wq.weight"] = to_interleaved(
            sd[p + "self_attn.q_proj.weight"], n_heads
        )
        state[f"layers.{i}.attention.wk.weight"] = to_interleaved(
            sd[p + "self_attn.k_proj.weight"], n_kv
        )
        state[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        state[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        state[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        state[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        state[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        state[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        state[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous().clone() for k, v in state.items()}, out / "consolidated.00.pth")
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "head_dim": head_dim,
        "hidden_dim": args.hidden_dim,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "norm_eps": args.norm_eps,
        "sliding_window": args.sliding_window,
        "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.max_position_embeddings,
    }
    (out / "params.json").write_text(json.dumps(params))
    shutil.copyfile(model_dir / "tokenizer.model", out / "tokenizer.model")
    return out
