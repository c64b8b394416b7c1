"""The embedded default model: a small Mistral-architecture text-to-SQL model shipped as package
data in `mlx_core/demo/assets/`, so a fresh install serves without downloading anything.

`python -m mlx_core.demo.build` rebuilds it (see build.py). Importing this package needs nothing
beyond the standard library: the server resolves the default path before loading any model.
"""

from __future__ import annotations

from pathlib import Path

# What a model folder needs for `mlx_core.weights.load_model`; build.json records how it was made.
ASSET_FILES = ("config.json", "model.safetensors", "tokenizer.model")


class DemoModelMissingError(FileNotFoundError):
    """The package was installed without the demo model's files."""


def assets_dir() -> Path:
    """The folder the demo model's files live in (whether or not they are there)."""
    return Path(__file__).resolve().parent / "assets"


def default_model_path() -> Path:
    """The embedded demo model's folder, ready for `load_model`.

    Raises DemoModelMissingError naming the missing files and how to get them back.
    """
    folder = assets_dir()
    missing = [name for name in ASSET_FILES if not (folder / name).is_file()]
    if missing:
        raise DemoModelMissingError(
            f"the embedded demo model is incomplete: {', '.join(missing)} missing from {folder}. "
            "Reinstall loraforge (the files ship as package data), rebuild them with "
            "`python -m mlx_core.demo.build`, or pass --model PATH to another model folder"
        )
    return folder


def resolve_model_path(path: str | None) -> str:
    """The model folder to load: `path` when given, else the embedded demo model's folder (which
    raises DemoModelMissingError when its files are missing)."""
    if path:
        return path
    return str(default_model_path())
