"""Debian's OpenBLAS under MLX's Linux CPU backend.

MLX's Linux CPU wheel multiplies fp32 matrices with a bundled reference BLAS (~3 GFLOP/s on a
2-core dev machine); with Debian's OpenBLAS (`libopenblas0-pthread`) preloaded the same wheel
runs them ~30x faster. Only a preload works (the wheel resolves its BLAS symbols when it loads),
so the `loraforge` command re-executes itself once with the library preloaded where that helps.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OPENBLAS = Path(f"/usr/lib/{platform.machine()}-linux-gnu/libopenblas.so.0")  # Debian/Ubuntu
OPT_OUT = "LORAFORGE_OPENBLAS"  # set to 0 to keep MLX's bundled BLAS
_TRIED = "LORAFORGE_OPENBLAS_PRELOADED"  # marks the re-executed process: never loop


def openblas_loaded() -> bool:
    """Whether this process has a system OpenBLAS mapped (preloaded or linked)."""
    try:
        # "libopenblas", not "openblas": numpy's wheels map their own libscipy_openblas, which
        # MLX does not use.
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def set_openblas_threads(n: int) -> bool:
    """Limit a loaded OpenBLAS to `n` threads; False if none is loaded."""
    if not openblas_loaded():
        return False
    try:
        ctypes.CDLL(OPENBLAS.name).openblas_set_num_threads(n)
    except (OSError, AttributeError):
        return False
    return True


def _runs_on_cpu() -> bool:
    try:
        import mlx.core as mx
    except ImportError:
        return False  # the CLI explains the missing backend
    return mx.default_device() == mx.cpu


def wants_openblas() -> bool:
    """Linux, MLX on its CPU backend, OpenBLAS installed but not loaded, and not opted out."""
    return (
        platform.system() == "Linux"
        and os.environ.get(OPT_OUT, "1") != "0"
        and _TRIED not in os.environ
        and OPENBLAS.is_file()
        and not openblas_loaded()
        and _runs_on_cpu()
    )


def reexec_with_openblas() -> None:
    """Replace this process by the same command with OpenBLAS preloaded, where `wants_openblas`.

    Returns (doing nothing) everywhere else. Only for a program's entry point: it restarts the
    interpreter with `sys.orig_argv`, so state built so far is gone.
    """
    if not wants_openblas():
        return
    preload = " ".join(p for p in (str(OPENBLAS), os.environ.get("LD_PRELOAD", "")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, _TRIED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # cannot re-execute (odd interpreter path): run as is, slower


# -- what this process multiplies fp32 matrices with ------------------------------------------
# MLX's reference BLAS runs ~3 GFLOP/s here, OpenBLAS 100-220 (or 9-22 on a machine busy with
# other work, where no restart would help: hence the warning goes by the library, not the time).
_PROBE_N = 256  # 2 * 256^3 = 34 MFLOP a matmul: ~10 ms on the reference BLAS, well under 1 ms else


@dataclass(frozen=True)
class BlasReport:
    """Which library fp32 matmuls use here, and how fast a small probe ran."""

    device: str  # "cpu" or "gpu"
    library: str  # "OpenBLAS", "MLX's reference BLAS", "Accelerate", or "GPU"
    gflops: float  # fp32 matmul speed of the probe; 0.0 on a GPU (not probed)

    @property
    def slow(self) -> bool:
        """On MLX's reference BLAS: fp32 products run ~30x slower than they could."""
        return self.device == "cpu" and self.library == "MLX's reference BLAS"

    def describe(self) -> str:
        if self.device != "cpu":
            return "matmuls run on the GPU"
        return f"fp32 matmuls on the CPU use {self.library}: {self.gflops:.0f} GFLOP/s"

    def fix(self) -> str | None:
        """What to do about a slow BLAS, or None when it is fast."""
        if not self.slow:
            return None
        if platform.system() == "Linux" and not OPENBLAS.is_file():
            how = "install Debian's OpenBLAS (apt install libopenblas0-pthread) and restart"
        elif os.environ.get(OPT_OUT) == "0":
            how = f"unset {OPT_OUT}=0 and restart"
        else:
            how = f"start loraforge with LD_PRELOAD={OPENBLAS}"
        return f"training and prompt processing run several times slower: {how}"


def probe_blas() -> BlasReport:
    """Time a small fp32 matmul on MLX's default device (a few ms on the CPU)."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return BlasReport("gpu", "GPU", 0.0)
    if platform.system() == "Darwin":
        library = "Accelerate"
    elif openblas_loaded():
        library = "OpenBLAS"
    else:
        library = "MLX's reference BLAS"
    n = _PROBE_N
    a = mx.random.normal((n, n), key=mx.random.key(0))
    mx.eval(a @ a)  # warm-up: first-call costs are not the library's speed
    best = float("inf")
    for _ in range(3):
        tic = time.perf_counter()
        mx.eval(a @ a)
        best = min(best, time.perf_counter() - tic)
    return BlasReport("cpu", library, 2 * n**3 / best / 1e9)


def report_blas(say: Callable[[str], object], warn: Callable[[str], object]) -> BlasReport:
    """Probe, then say what fp32 matmuls use (`say`), or warn loudly with the fix (`warn`)."""
    report = probe_blas()
    fix = report.fix()
    if fix is None:
        say(report.describe())
    else:
        warn(f"{report.describe()}; {fix}")
    return report
