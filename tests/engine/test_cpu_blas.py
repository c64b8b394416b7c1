"""The `loraforge` entry point re-executes itself with Debian's OpenBLAS on MLX's Linux CPU backend."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_core.cpu_blas import OPENBLAS, OPT_OUT

pytestmark = pytest.mark.slow  # starts other processes

PROBE = (
    "from mlx_core.cpu_blas import openblas_loaded, reexec_with_openblas\n"
    "reexec_with_openblas()\n"
    "print(openblas_loaded())\n"
)


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT)}
    clean = {k: v for k, v in clean.items() if not k.startswith("LORAFORGE_OPENBLAS")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_entry_point_preloads_openblas_where_it_helps() -> None:
    helps = platform.system() == "Linux" and OPENBLAS.is_file() and mx.default_device() == mx.cpu
    assert _probe() == str(helps)


def test_opting_out_keeps_mlx_blas() -> None:
    assert _probe(**{OPT_OUT: "0"}) == "False"


@pytest.mark.skipif(not OPENBLAS.is_file(), reason="Debian's libopenblas0-pthread not installed")
def test_an_existing_preload_is_kept() -> None:
    # A user's own LD_PRELOAD survives the re-execution (theirs after ours).
    assert _probe(LD_PRELOAD="libm.so.6") == str(mx.default_device() == mx.cpu)
