"""`python -m mlx_core.train SPEC.json [--parent-pid PID]`: run one fine-tune from a spec file.

The one trainer entry: the fine-tune job worker starts it for every job (with `--parent-pid`), and
`mlx.launch -n N --backend ring|nccl python -m mlx_core.train SPEC.json` runs it over several
processes. People use `loraforge train`.

With `--parent-pid` the process dies with the worker that started it (PR_SET_PDEATHSIG, plus a
watchdog thread comparing getppid()), so a killed server never leaves a trainer writing into the
job folder. Any failure is also written as a last `error` event to the run's events file, which
the worker turns into the job's `error`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from mlx_core.cpu_blas import reexec_with_openblas, report_blas
from mlx_core.errors import is_user_error
from mlx_core.train.config import TrainSpec
from mlx_core.train.events import ErrorEvent, append_event
from mlx_core.train.loop import train
from mlx_core.train.memory import MemoryPreflightError

PR_SET_PDEATHSIG = 1
_MEMORY_HINT = (
    " In the job request, lower hyperparameters.batch_size, lora.num_layers or "
    "lora.max_seq_len, or set lora.quantize to 4."
)


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the worker that started this run exits, however it ends (kill -9 too).

    The worker is the direct parent of a one-process run, and the grandparent of each rank of a
    run under mlx.launch: ranks watch the worker's pid itself, not their parent's.
    """
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the kernel kills us when the parent dies

    direct = os.getppid() == parent_pid

    def alive() -> bool:
        if direct:  # reparented the moment the worker exits, even before it is reaped
            return os.getppid() == parent_pid
        try:  # a rank: the worker is its grandparent
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's (not our own worker, but not dead)
            return True
        try:  # a killed worker nobody reaped yet is a zombie: as good as dead
            stat = Path(f"/proc/{parent_pid}/stat").read_text()
            return stat.rpartition(")")[2].split()[0] != "Z"
        except (OSError, IndexError):
            return True  # no /proc (macOS): kill(0) said it exists

    def watch() -> None:
        # Where prctl does not exist (macOS), for ranks (their parent is the launcher), and for
        # a worker that died before prctl ran.
        while alive():
            time.sleep(1.0)
        os._exit(3)

    if not alive():
        os._exit(3)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_core.train",
        description="Run one fine-tune from a spec file (the job worker and mlx.launch start "
        "this; people use `loraforge train`).",
    )
    parser.add_argument("spec", help='spec.json: {"model": ..., "data": ..., "config": {...}}')
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process exits (the worker)"
    )
    ns = parser.parse_args(argv)
    # A worker started before OpenBLAS was installed still gets fast trainers: each trainer
    # decides for itself (the re-executed process keeps its pid, so --parent-pid still holds).
    reexec_with_openblas()
    if ns.parent_pid is not None:
        _die_with_parent(ns.parent_pid)
    report_blas(
        lambda line: print(f"mlx_core.train: {line}", file=sys.stderr, flush=True),
        lambda line: print(f"mlx_core.train: WARNING: {line}", file=sys.stderr, flush=True),
    )
    try:
        spec = TrainSpec.read(Path(ns.spec))
    except Exception as e:
        print(f"mlx_core.train: {e}", file=sys.stderr)
        return 2
    try:
        train(spec.model, spec.data, spec.config)
        return 0
    except Exception as e:
        if is_user_error(e):
            memory = isinstance(e, MemoryPreflightError)
            error = ErrorEvent(
                step=0,
                code="insufficient_memory" if memory else "training_failed",
                message=str(e) + (_MEMORY_HINT if memory else ""),
            )
            print(f"mlx_core.train: {e}", file=sys.stderr)
            code = 2
        else:
            traceback.print_exc()
            error = ErrorEvent(
                step=0,
                code="training_failed",
                message=f"The trainer crashed: {type(e).__name__}: {e}. "
                f"{Path(ns.spec).parent / 'train.log'} has the traceback.",
            )
            code = 1
    if spec.config.events_jsonl:
        append_event(spec.config.events_jsonl, error)
    return code


if __name__ == "__main__":
    sys.exit(main())
