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
from pathlib import Path

OPENBLAS = Path(f"/usr/lib/{platform.machine()}-linux-gnu/libopenblas.so.0")  # Debian/Ubuntu
OPT_OUT = "LORAFORGE_OPENBLAS"  # set to 0 to keep MLX's bundled BLAS
_TRIED = "LORAFORGE_OPENBLAS_PRELOADED"  # marks the re-executed process: never loop


def openblas_loaded() -> bool:
    """Whether this process has an OpenBLAS mapped (preloaded or linked)."""
    try:
        return "openblas" in Path("/proc/self/maps").read_text()
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
