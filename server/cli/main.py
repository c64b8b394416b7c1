"""`loraforge`: one command line for serving, training and model tools.

Each subcommand registers itself from the module that implements it (`register(subparsers)`
returning nothing; the parser's `run` default takes the parsed namespace and returns an exit code).
Known failures (bad paths, bad data, models that do not fit) print one line and exit 2: users see
what to fix, never a traceback. Output cut off by its reader (`loraforge jobs events | head`)
ends quietly with 141, as `cat` does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

from mlx_core.errors import LoraforgeError, is_user_error

# module name -> its `register(subparsers)`; order is the order of `loraforge --help`.
COMMAND_MODULES = (
    "server.cli.serve",  # serve, worker, db
    "server.cli.model",  # generate, convert
    "server.cli.adapters",  # fuse
    "server.cli.train",  # train, lora
    "server.cli.eval",  # eval, demo-data
    "server.cli.jobs",  # jobs
)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left


def _check_backend() -> None:
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        hint = (
            "pip install 'loraforge[cpu]' (CPU) or 'loraforge[cuda]' (NVIDIA, CUDA 13)"
            if platform.system() == "Linux"
            else "pip install mlx"
        )
        raise LoraforgeError(f"MLX has no backend installed here ({e}): {hint}") from e


def _report_blas(command: str) -> None:
    # Long-running commands say what fp32 matmuls run on: without OpenBLAS a CPU fine-tune is
    # about 7x slower, which nothing else would reveal.
    from mlx_core.cpu_blas import report_blas

    report_blas(
        lambda line: print(f"loraforge {command}: {line}", file=sys.stderr, flush=True),
        lambda line: print(f"loraforge {command}: WARNING: {line}", file=sys.stderr, flush=True),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge",
        description="Serve a Mistral-class model with MLX behind an OpenAI-compatible API, "
        "hot-swap LoRA adapters and run LoRA fine-tunes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "run", None):
        parser.print_help()
        return 1
    try:
        if getattr(ns, "needs_mlx", True):
            _check_backend()
        if getattr(ns, "reports_blas", False):
            _report_blas(ns.command)
        code = int(ns.run(ns) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:
        if is_user_error(e):  # bad input or a missing file: the message says what to do
            print(f"loraforge {ns.command}: {e}", file=sys.stderr)
            return 2
        raise


def _discard_stdout() -> None:
    # Python flushes stdout again at exit; with the reader gone that would print a second error.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:  # not a real file (e.g. captured by a test): nothing is flushed to a pipe
        pass


def entry() -> int:
    """The `loraforge` console script: `main` in a process with the fastest CPU BLAS at hand."""
    from mlx_core.cpu_blas import reexec_with_openblas

    reexec_with_openblas()
    return main()
