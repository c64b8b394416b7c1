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


def _train_stderr(**env: str) -> str:
    # `train` reports the BLAS before anything else, then stops at the missing model folder.
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", OPT_OUT)}
    clean = {k: v for k, v in clean.items() if not k.startswith("LORAFORGE_OPENBLAS")}
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "train", "--model", "/nonexistent", "--data", "/x"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    return out.stderr


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the probe reports CPU BLAS only")
def test_long_running_commands_say_which_blas_and_warn_with_the_fix_when_slow() -> None:
    slow = _train_stderr(**{OPT_OUT: "0"})
    assert "WARNING: fp32 matmuls on the CPU use MLX's reference BLAS" in slow, slow
    assert f"unset {OPT_OUT}=0" in slow
    if platform.system() == "Linux" and OPENBLAS.is_file():
        fast = _train_stderr()
        assert "fp32 matmuls on the CPU use OpenBLAS" in fast and "WARNING" not in fast, fast
