"""`loraforge fuse`: merge a LoRA adapter into its base model and save a standalone model folder.

Flag names follow mlx-lm's `mlx_lm.fuse` (--adapter-path, --save-path, --de-quantize) and accept
mlx-examples' `--adapter-file`, so existing commands keep working.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "fuse",
        help="merge a LoRA adapter (loraforge, mlx-lm, PEFT or mlx-examples "
        "format) into the base model's weights and save the result",
    )
    f.add_argument(
        "--model", default=None, help="base model folder (default: the embedded demo model)"
    )
    f.add_argument(
        "--adapter-path",
        "--adapter-file",
        dest="adapter_path",
        default=None,
        help="adapter folder or .npz file (default: ./adapters, else ./adapters.npz)",
    )
    f.add_argument("--save-path", default="fused_model", help="folder to write the fused model to")
    f.add_argument(
        "--de-quantize",
        dest="dequantize",
        action="store_true",
        help="write a dense model even if the base is quantized",
    )
    f.set_defaults(run=run_fuse)


def default_adapter_path() -> str:
    """mlx-lm's default output folder, else mlx-examples' default file."""
    for candidate in ("adapters", "adapters.npz"):
        if Path(candidate).exists():
            return candidate
    from mlx_core.errors import LoraforgeError

    raise LoraforgeError(
        "no --adapter-path given and neither ./adapters nor ./adapters.npz exists: "
        "pass --adapter-path to the adapter folder or .npz file"
    )


def run_fuse(ns: argparse.Namespace) -> int:
    from mlx_core.demo import resolve_model_path
    from mlx_core.lora.fuse import fuse

    out = fuse(
        resolve_model_path(ns.model),
        ns.adapter_path or default_adapter_path(),
        ns.save_path,
        dequantize=ns.dequantize,
    )
    print(f"wrote {out}")
    return 0
