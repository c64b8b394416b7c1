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

# module name -> its `register(subparsers)`; order is the order of `loraforge --help`.
COMMAND_MODULES = (
    "server.cli_serve",  # serve, worker, db
    "server.cli_model",  # generate, convert
    "server.cli_adapters",  # fuse
    "server.cli_train",  # train, lora
    "server.cli_eval",  # eval, demo-data
    "server.cli_jobs",  # jobs
)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left


class UserError(Exception):
    """A failure the user can fix; printed as one line."""


def _check_backend() -> None:
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        hint = (
            "pip install 'loraforge[cpu]' (CPU) or 'loraforge[cuda]' (NVIDIA, CUDA 13)"
            if platform.system() == "Linux"
            else "pip install mlx"
        )
        raise UserError(f"MLX has no backend installed here ({e}): {hint}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge",
        description="Serve a Mistral-class model with MLX behind an OpenAI-compatible API, "
        "hot-swap LoRA adapters and run LoRA fine-tunes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not written yet in this checkout
                continue
            raise
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
        code = int(ns.run(ns) or 0)
        sys.stdout.flush()  # a closed pipe shows here, where it is handled, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except UserError as e:
        print(f"loraforge {ns.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if _is_user_error(e):
            print(f"loraforge {ns.command}: {e}", file=sys.stderr)
            return 2
        raise


def _discard_stdout() -> None:
    # Python flushes stdout again at exit; with the reader gone that would print a second error.
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:  # not a real file (e.g. captured by a test): nothing is flushed to a pipe
        pass


def _is_user_error(e: Exception) -> bool:
    """Errors from the engine that describe bad input (they already say what to do)."""
    from mlx_core.errors import USER_ERRORS

    return isinstance(e, USER_ERRORS)


def entry() -> int:
    """The `loraforge` console script: `main` in a process with the fastest CPU BLAS at hand."""
    from mlx_core.cpu_blas import reexec_with_openblas

    reexec_with_openblas()
    return main()


if __name__ == "__main__":
    # `python -m server.cli` runs this file as __main__, a second copy of the module: run the
    # imported server.cli, whose UserError is the one the server.cli_* modules raise.
    from server.cli import entry as _entry

    sys.exit(_entry())
