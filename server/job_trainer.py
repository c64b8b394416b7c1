"""One fine-tune job's trainer, a child process of the worker:
`python -m server.job_trainer jobs/<id>/spec.json --parent-pid <worker pid>`.

It trains with `mlx_core.train` (memory preflight first) and dies with the worker that started it
(PR_SET_PDEATHSIG, plus a watchdog thread comparing getppid()), so a killed server never leaves a
trainer writing into the job folder. A failure is written as a last `error` event, which the
worker turns into the job's `error`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
_MEMORY_HINT = (
    " In the job request, lower hyperparameters.batch_size, lora.num_layers or "
    "lora.max_seq_len, or set lora.quantize to 4."
)


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the worker that started this process exits, however it ends (kill -9 too)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the kernel kills us when the parent dies

    def watch() -> None:
        # Where prctl does not exist (macOS), and for a parent that died before prctl ran.
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(3)

    if os.getppid() != parent_pid:
        os._exit(3)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.job_trainer",
        description="Run one fine-tune job's trainer (the worker "
        "starts this; people use `loraforge train`).",
    )
    parser.add_argument("spec", help='spec.json: {"model", "data", "config"}')
    parser.add_argument("--parent-pid", type=int, required=True)
    ns = parser.parse_args(argv)
    _die_with_parent(ns.parent_pid)

    from mlx_core.errors import USER_ERRORS
    from mlx_core.memory import MemoryPreflightError
    from mlx_core.train import TrainConfig, train

    spec = json.loads(Path(ns.spec).read_text())
    config = TrainConfig.from_dict(spec["config"])
    try:
        train(spec["model"], spec["data"], config)
        return 0
    except USER_ERRORS as e:
        memory = isinstance(e, MemoryPreflightError)
        error = {
            "code": "insufficient_memory" if memory else "training_failed",
            "message": str(e) + (_MEMORY_HINT if memory else ""),
        }
        print(f"loraforge job: {e}", file=sys.stderr)
        code = 2
    except Exception as e:
        import traceback

        traceback.print_exc()
        error = {
            "code": "training_failed",
            "message": f"The trainer crashed: {type(e).__name__}: "
            f"{e}. {Path(ns.spec).parent / 'train.log'} has the traceback.",
        }
        code = 1
    with open(config.events_jsonl, "a", encoding="utf-8") as f:
        f.write(json.dumps({"type": "error", "step": 0, "time": time.time(), **error}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
