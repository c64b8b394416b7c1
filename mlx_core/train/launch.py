"""Starting data-parallel ranks: the command that runs one program on N processes with MLX's launcher.

NCCL with one process per GPU on CUDA, the ring backend elsewhere (ranks on this machine, over
local ports). The fine-tune worker starts job trainers this way (`--job-devices N`), and
`benchmarks/train.py --launch N` measures it.
"""

from __future__ import annotations

import socket
import sys

# The `mlx.launch` console script's entry point, run by this interpreter: the script itself may
# not be on PATH, and its module has no __main__ guard (`python -m` would do nothing).
_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"


def backend() -> str:
    """ "nccl" where MLX runs on CUDA (Linux GPU), else "ring"."""
    import mlx.core as mx

    return "nccl" if mx.default_device() == mx.gpu and sys.platform == "linux" else "ring"


def launch_command(ranks: int, command: list[str]) -> list[str]:
    """`command` (a program and its arguments) on `ranks` processes; `command` itself for 1."""
    if ranks == 1:
        return command
    chosen = backend()
    ports = ["--starting-port", str(free_ports(ranks))] if chosen == "ring" else []
    return [sys.executable, "-c", _LAUNCH, "-n", str(ranks), "--backend", chosen, *ports, *command]


def free_ports(n: int) -> int:
    """The first of `n` consecutive free ports on localhost (the ring backend's ranks)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + n > 65535:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(first, first + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no run of free local ports for the ring backend's ranks; try again")
