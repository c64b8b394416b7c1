"""A 4-bit quantized matrix-vector kernel for NVIDIA GPUs (batch-1 decode).

Decoding one token multiplies a few activation rows by every weight matrix: the time is the time
to stream the weights. MLX's CUDA quantized matmul reaches a fraction of the card's bandwidth on
such skinny products, so here one warp walks one weight row with 16-byte loads (32 four-bit
values per lane per step, always inside one quantization group), dequantizes in registers and
reduces with warp shuffles. Used only on CUDA, for 4-bit affine weights and at most `MAX_ROWS`
activation rows; everything else goes through `mx.quantized_matmul`.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

MAX_ROWS = 8  # activation rows (batch x tokens) handled by the kernel
_WARPS_PER_BLOCK = 8

_SOURCE = """
    const int lane = threadIdx.x & 31;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int n = warp;                   // output column = weight row
    if (n >= N) return;
    const int words = K / 8;              // uint32 per weight row
    const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)n * words);
    const __nv_bfloat16* srow = scales + (size_t)n * (K / G);
    const __nv_bfloat16* brow = biases + (size_t)n * (K / G);
    float acc[M];
    #pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    constexpr int CHUNKS = K / 32;                 // 32 values (one uint4) per chunk
    constexpr int U = 4;                           // chunks in flight per lane
    for (int c0 = lane; c0 < CHUNKS; c0 += 32 * U) {
        uint4 q[U];
        float s[U], b[U];
        #pragma unroll
        for (int u = 0; u < U; ++u) {              // issue every load before any math
            const int c = c0 + 32 * u;
            if (c < CHUNKS) {
                q[u] = wrow[c];
                s[u] = __bfloat162float(srow[(c * 32) / G]);
                b[u] = __bfloat162float(brow[(c * 32) / G]);
            }
        }
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + 32 * u;
            if (c >= CHUNKS) break;
            const int k0 = c * 32;
            const uint32_t qw[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
            #pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)m * K + k0);
                float dot = 0.f, xs = 0.f;
                #pragma unroll
                for (int part = 0; part < 4; ++part) {
                    const uint4 xx = xv[part];      // 8 bf16 activations
                    const uint32_t xw[4] = {xx.x, xx.y, xx.z, xx.w};
                    #pragma unroll
                    for (int h = 0; h < 4; ++h) {
                        const __nv_bfloat162 pair = *reinterpret_cast<const __nv_bfloat162*>(&xw[h]);
                        const float2 f = __bfloat1622float2(pair);
                        const uint32_t word = qw[part];
                        dot = fmaf((float)((word >> (8 * h)) & 0xF), f.x, dot);
                        dot = fmaf((float)((word >> (8 * h + 4)) & 0xF), f.y, dot);
                        xs += f.x + f.y;
                    }
                }
                acc[m] = fmaf(s[u], dot, fmaf(b[u], xs, acc[m]));
            }
        }
    }
    #pragma unroll
    for (int m = 0; m < M; ++m) {
        float v = acc[m];
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
        if (lane == 0) y[(size_t)m * N + n] = __float2bfloat16(v);
    }
"""


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="loraforge_qmv4",
        input_names=["x", "w", "scales", "biases"],
        output_names=["y"],
        source=_SOURCE,
    )


@functools.cache
def cuda_available() -> bool:
    try:
        return bool(mx.cuda.is_available()) and mx.default_device() == mx.gpu
    except AttributeError:
        return False


def qmv4(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """x (..., K) bf16 with at most MAX_ROWS rows; w (N, K/8) uint32 -> (..., N) bf16."""
    K = x.shape[-1]
    N = w.shape[0]
    # The kernel reads x and writes y as flat rows (inputs arrive row-contiguous), so x goes in
    # and y comes out in the caller's shape: no reshape operations in the step's graph.
    (y,) = _kernel()(
        inputs=[x, w, scales, biases],
        template=[("M", x.size // K), ("N", N), ("K", K), ("G", group_size)],
        grid=(N * 32, 1, 1),
        threadgroup=(32 * _WARPS_PER_BLOCK, 1, 1),
        output_shapes=[(*x.shape[:-1], N)],
        output_dtypes=[mx.bfloat16],
    )
    return y


class FastQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that takes the custom kernel for few-row 4-bit bf16 products on CUDA."""

    def __call__(self, x: mx.array) -> mx.array:
        if (
            self.bits == 4
            and x.dtype == mx.bfloat16
            and x.size // x.shape[-1] <= MAX_ROWS
            and getattr(self, "mode", "affine") == "affine"
            and "bias" not in self
            and x.shape[-1] % 32 == 0
            and self.group_size % 32 == 0
            and cuda_available()
        ):
            return qmv4(x, self["weight"], self["scales"], self["biases"], self.group_size)
        return super().__call__(x)


def use_fast_kernels(model: nn.Module) -> None:
    """Switch the model's quantized linears to FastQuantizedLinear (same parameters, same
    results within bf16 rounding); a no-op off CUDA."""
    if not cuda_available():
        return
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear:
            # Same attributes and parameters; only the forward differs.
            m.__class__ = FastQuantizedLinear
