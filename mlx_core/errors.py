"""The engine's user-facing error types in one place (the CLI prints these as one line)."""

from __future__ import annotations

import importlib

# (module, class) pairs; looked up lazily so importing this module stays cheap.
_ERRORS = (
    ("mlx_core.config", "ConfigError"),
    ("mlx_core.weights", "WeightsError"),
    ("mlx_core.tokenizer", "TokenizerError"),
    ("mlx_core.examples", "DataFormatError"),
    ("mlx_core.lora", "AdapterError"),
    ("mlx_core.engine", "EngineError"),
    ("mlx_core.adapter_io", "AdapterFormatError"),
    ("mlx_core.memory", "MemoryPreflightError"),
    ("mlx_core.train", "TrainingConfigError"),
    ("mlx_core.evaluate", "EvalError"),
)


def _load() -> tuple[type[Exception], ...]:
    found: list[type[Exception]] = [FileNotFoundError]
    for module, name in _ERRORS:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        found.append(cls)
    return tuple(found)


def __getattr__(name: str):
    if name == "USER_ERRORS":
        return _load()
    raise AttributeError(name)
