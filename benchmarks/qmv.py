"""The 4-bit matrix-vector kernel (mlx_core/kernels.py) against mx.quantized_matmul on Mistral-7B's
projection shapes: max error and time per product. CUDA only. Prints JSON."""

from __future__ import annotations

import time

import mlx.core as mx

from benchmarks.common import report
from mlx_core.kernels import cuda_available, qmv4

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (32000, 4096),
}


def timeit(fn, n: int = 100) -> float:
    mx.eval([fn() for _ in range(10)])
    start = time.perf_counter()
    mx.eval([fn() for _ in range(n)])  # one sync for all, so launch latency overlaps
    return (time.perf_counter() - start) / n


def main() -> None:
    if not cuda_available():
        raise SystemExit("needs MLX's CUDA backend")
    results = {}
    for name, (n, k) in SHAPES.items():
        for group in (64, 32):
            w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
            wq, s, b = mx.quantize(w, group_size=group, bits=4)
            for rows in (1, 4):
                x = mx.random.normal((rows, k)).astype(mx.bfloat16)
                ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group, bits=4)
                ours = qmv4(x, wq, s, b, group)
                err = float(mx.max(mx.abs(ours.astype(mx.float32) - ref.astype(mx.float32))))
                scale = float(mx.max(mx.abs(ref.astype(mx.float32))))
                t_ref = timeit(
                    lambda x=x, wq=wq, s=s, b=b, group=group: mx.quantized_matmul(
                        x, wq, s, b, transpose=True, group_size=group, bits=4
                    )
                )
                t_ours = timeit(lambda x=x, wq=wq, s=s, b=b, group=group: qmv4(x, wq, s, b, group))
                nbytes = wq.nbytes + s.nbytes + b.nbytes
                results[f"{name}_g{group}_m{rows}"] = {
                    "max_abs_err": err,
                    "ref_max_abs": scale,
                    "mlx_us": round(t_ref * 1e6, 1),
                    "ours_us": round(t_ours * 1e6, 1),
                    "mlx_GBps": round(nbytes / t_ref / 1e9),
                    "ours_GBps": round(nbytes / t_ours / 1e9),
                }
    report("qmv4", {"shapes": SHAPES}, results)


if __name__ == "__main__":
    main()
