"""Mistral-7B architecture: RMSNorm, RoPE, grouped-query attention with a sliding window, SwiGLU.

q/k/v and gate/up are fused into one projection each (`qkv_proj`, `gate_up_proj`): fewer, larger
matmuls stream the weights faster at batch 1. Checkpoints keep Hugging Face's separate names;
`weights.py` fuses on load and splits on save.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlx_core.cache import KVCache, Mask
from mlx_core.config import ModelArgs


def rope_at_positions(x: mx.array, positions: mx.array, base: float) -> mx.array:
    """RoPE (Hugging Face's rotate-half layout) at explicit per-token positions (B, L).

    mx.fast.rope only takes one offset per row; packed training rows restart positions at every
    example, so they need this form.
    """
    D = x.shape[-1]
    inv_freq = base ** (-mx.arange(0, D, 2, dtype=mx.float32) / D)
    angles = positions[:, None, :, None].astype(mx.float32) * inv_freq  # (B, 1, L, D/2)
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# A few query rows over a longer cached key sequence (a prefix-hit group, the short last chunk
# of a prefill) are computed as plain products instead of with mx.fast's attention: on CUDA,
# MLX gives such masked multi-row calls to cuDNN, which builds and caches an execution plan per
# exact (rows, query length, key length, mask) shape, and those shapes are new almost every
# serving step (benchmarks/NOTES.md section 10). The bounds keep long prefill chunks on the
# flash kernels and the score matrix small (B x heads x queries x keys float32: 32M is 128 MB).
SHORT_QUERY_ROWS = 128
SHORT_QUERY_SCORES = 2**25


def attention_short_query(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask
) -> mx.array:
    """softmax(q k^T * scale + mask) v for q (B, H, L, D) over k, v (B, Hkv, K, D), L < K, with
    grouped-query heads; `mask` is a boolean array broadcasting to (B, 1, L, K) or (L, K),
    "causal" (the last L keys are the queries' own positions) or None."""
    B, H, L, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, L, D) * scale
    scores = (qg @ mx.swapaxes(k, -1, -2)[:, :, None]).astype(mx.float32)  # (B, Hkv, rep, L, K)
    if isinstance(mask, str):  # "causal", aligned at the end: query i sits at key K - L + i
        mask = mx.arange(K - L, K)[:, None] >= mx.arange(K)[None, :]
    if mask is not None:
        if mask.ndim == 4:  # (B, 1, L, K): one row's mask for all its heads
            mask = mask[:, :, None]
        scores = mx.where(mask, scores, mx.array(-mx.inf, dtype=scores.dtype))
    weights = mx.softmax(scores, axis=-1).astype(v.dtype)
    return (weights @ v[:, :, None]).reshape(B, H, L, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_theta = args.rope_theta
        self.scale = 1.0 / math.sqrt(args.head_dim)
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.dim, q_dim + 2 * kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, args.dim, bias=False)

    def __call__(
        self,
        x: mx.array,
        mask: Mask,
        cache: KVCache | None,
        layer: int,
        rope_offset: int | mx.array,
        positions: mx.array | None,
    ) -> mx.array:
        B, L, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        # Heads of q, k and v are consecutive blocks of D columns: one reshape, one transpose and
        # one RoPE call for q and k together. At batch 1 the host's microseconds per operation
        # (building and encoding it) bound decode: benchmarks/NOTES.md, section 4.
        qkv = self.qkv_proj(x)
        if L == 1:  # (B, 1, heads*D) -> (B, heads, 1, D) is a reshape: no transpose needed
            qkv = qkv.reshape(B, H + 2 * Hkv, 1, D)
        else:
            qkv = qkv.reshape(B, L, H + 2 * Hkv, D).transpose(0, 2, 1, 3)
        qk, v = mx.split(qkv, [H + Hkv], axis=1)
        if positions is not None:
            qk = rope_at_positions(qk, positions, self.rope_theta)
        else:
            qk = mx.fast.rope(
                qk, D, traditional=False, base=self.rope_theta, scale=1.0, offset=rope_offset
            )
        q, k = mx.split(qk, [H], axis=1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if (
            1 < L <= SHORT_QUERY_ROWS
            and L < k.shape[2]
            and B * H * L * k.shape[2] <= SHORT_QUERY_SCORES
        ):
            out = attention_short_query(q, k, v, self.scale, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        if L == 1:
            return self.o_proj(out.reshape(B, 1, H * D))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, H * D))


@partial(mx.compile, shapeless=True)  # shapeless: one trace for every prompt length
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel (silu's own and a multiply otherwise)."""
    return gate * mx.sigmoid(gate) * up


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden_dim = args.hidden_dim
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(_swiglu(gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x, mask, cache, layer, rope_offset, positions) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, layer, rope_offset, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class MistralBody(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [TransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)


class Mistral(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = MistralBody(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def new_cache(self, batch_size: int = 1, pad: list[int] | None = None) -> KVCache:
        return KVCache(self.args.n_layers, batch_size, self.args.sliding_window, pad)

    def __call__(
        self,
        tokens: mx.array,
        cache: KVCache | None = None,
        positions: mx.array | None = None,
        segment_ids: mx.array | None = None,
        last_only: bool = False,
        output_positions: mx.array | None = None,
    ) -> mx.array:
        """Logits (B, L, vocab) for token ids (B, L); (B, 1, vocab) with `last_only` (prefill);
        (B, A, vocab) for the positions `output_positions` (B, A) only (a loss on a few targets
        per row need not project every position onto the vocabulary).

        With a cache: the tokens continue every row of the cache. Without: a fresh causal pass;
        `positions` and `segment_ids` (B, L) describe packed training rows (attention stays
        inside a segment, positions restart per segment).
        """
        h = self.model.embed_tokens(tokens)
        L = tokens.shape[1]
        if cache is not None:
            mask = cache.prepare(L)
            rope_offset = cache.rope_offsets()
        else:
            mask = self._training_mask(L, segment_ids)
            rope_offset = 0
        for i, layer in enumerate(self.model.layers):
            h = layer(h, mask, cache, i, rope_offset, positions)
        if cache is not None:
            cache.advance(L)
        if last_only:
            h = h[:, -1:, :]
        elif output_positions is not None:
            h = mx.take_along_axis(h, output_positions[..., None], axis=1)
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def _training_mask(self, L: int, segment_ids: mx.array | None) -> Mask:
        window = self.args.sliding_window
        if segment_ids is None and (window is None or L <= window):
            return "causal"
        idx = mx.arange(L)
        mask = idx[None, :] <= idx[:, None]
        if window is not None and L > window:
            mask = mask & (idx[:, None] - idx[None, :] < window)
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            return (mask[None] & same)[:, None]
        return mask
