"""One `Settings` object for the service, from CLI flags, `LORAFORGE_*` env vars and defaults.

Precedence is explicit: a flag the user typed beats its env twin `LORAFORGE_<NAME>`, which beats
the default below. Each field declares its help text once; the flag (`--max-num-seqs`), the env
var (`LORAFORGE_MAX_NUM_SEQS`) and the parser of its text all follow from the field's name and
type, so the three can never drift apart.

Data lives in `~/.loraforge` by default (like `~/.cache`): one place per user, whichever folder
`loraforge serve` or `loraforge worker` is started from, so both see the same jobs and adapters.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LORAFORGE_"
DEMO_MODEL_ID = "loraforge-demo"  # the served id of the embedded default model (no --model)
DEFAULT_DATA_DIR = Path("~/.loraforge")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has a value the service cannot use; the message names the flag and env var."""


def _opt(default: Any, help: str, *, repr: bool = True, **extra: Any) -> Any:
    return field(default=default, repr=repr, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    model: str | None = _opt(
        None,
        "model folder or file to serve (HF safetensors, Mistral .pth, MLX); "
        "unset = the embedded default model",
    )
    served_model_name: str | None = _opt(
        None,
        "model id clients send as `model` (default: the model folder's name, or "
        "loraforge-demo for the embedded model)",
    )
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 = every interface)")
    port: int = _opt(8000, "TCP port to listen on")
    api_key: str | None = _opt(
        None,
        "require `Authorization: Bearer <key>` on /v1/*, /fine-tunes* and the tokenizer routes "
        "(unset = no auth)",
        repr=False,
    )
    data_dir: Path = _opt(DEFAULT_DATA_DIR, "folder for the database, files/, adapters/, jobs/")
    database_url: str = _opt(
        "",
        "SQLAlchemy URL of the job/adapter database (default: sqlite file <data-dir>/loraforge.db)",
    )
    max_loaded_adapters: int = _opt(8, "LoRA adapters resident in memory at once (LRU beyond)")
    max_lora_rank: int = _opt(64, "largest LoRA rank an adapter may have")
    max_concurrent_jobs: int = _opt(1, "fine-tune jobs this worker trains at the same time")
    job_devices: int = _opt(
        1,
        "processes each fine-tune job trains on, data-parallel: above 1 the trainer starts under "
        "mlx.launch (NCCL, one process per GPU, on CUDA; the ring backend elsewhere)",
    )
    job_max_attempts: int = _opt(
        3,
        "runs in a row that may stop (lost worker, killed trainer) without saving a new "
        "checkpoint before the job fails; a run that saved one does not count",
    )
    job_retry_backoff_s: float = _opt(
        5.0,
        "seconds a stopped job waits before it is retried when its run saved no new "
        "checkpoint, doubling with each such run in a row (a run that saved one resumes at once)",
    )
    max_model_len: int | None = _opt(
        None, "longest prompt + completion in tokens (unset = the model's own limit)"
    )
    max_num_seqs: int = _opt(32, "sequences decoded together in one batch")
    max_queue: int = _opt(256, "requests waiting for a batch slot before new ones get 429")
    kv_cache_memory_gb: float | None = _opt(
        None, "memory for the KV cache in GB (unset = sized from max-num-seqs x max-model-len)"
    )
    prefix_cache_mb: int = _opt(512, "memory for reusing KV of shared prompt prefixes (0 = off)")
    max_upload_mb: float = _opt(
        512.0, "largest file accepted by POST /v1/files and adapter uploads, in MB"
    )
    max_body_mb: float = _opt(
        16.0, "largest JSON request body, in MB (completions, chat, jobs; uploads: max-upload-mb)"
    )
    max_adapter_unpacked_mb: float = _opt(
        4096.0, "largest total size an uploaded adapter archive may unpack to, in MB"
    )
    max_adapter_files: int = _opt(1000, "most entries an uploaded adapter archive may hold")
    shutdown_grace_s: float = _opt(
        30.0,
        "seconds running requests get to finish on SIGTERM/Ctrl-C; streams still open then end "
        "with an error event",
    )
    start_worker: bool = _opt(True, "run the fine-tune job worker inside the server process")
    log_level: str = _opt("info", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        # Derived values are filled here so that Settings(...) built in code (tests) gets the same
        # normalisation as Settings.from_env(); frozen, so via object.__setattr__.
        data_dir = Path(self.data_dir).expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'loraforge.db'}")
        object.__setattr__(self, "log_level", self.log_level.lower())
        self._validate()

    def _validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(_bad("port", self.port, "use 1..65535 (0 = any free port)"))
        for name in (
            "max_loaded_adapters",
            "max_lora_rank",
            "max_num_seqs",
            "max_queue",
            "max_adapter_files",
            "job_devices",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(_bad(name, getattr(self, name), "use 1 or more"))
        for name in ("max_concurrent_jobs", "prefix_cache_mb"):
            if getattr(self, name) < 0:
                raise SettingsError(_bad(name, getattr(self, name), "use 0 or more"))
        if self.job_max_attempts < 1:
            raise SettingsError(_bad("job_max_attempts", self.job_max_attempts, "use 1 or more"))
        if not 0 <= self.job_retry_backoff_s <= 86_400:
            raise SettingsError(
                _bad("job_retry_backoff_s", self.job_retry_backoff_s, "use 0..86400 seconds")
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise SettingsError(
                _bad("max_model_len", self.max_model_len, "use 1 or more, or unset it")
            )
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise SettingsError(
                _bad("kv_cache_memory_gb", self.kv_cache_memory_gb, "use a size > 0, or unset it")
            )
        for name in ("max_upload_mb", "max_body_mb", "max_adapter_unpacked_mb"):
            if getattr(self, name) <= 0:
                raise SettingsError(_bad(name, getattr(self, name), "use a size > 0"))
        if self.shutdown_grace_s < 0:
            raise SettingsError(_bad("shutdown_grace_s", self.shutdown_grace_s, "use 0 or more"))
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(_bad("log_level", self.log_level, f"use one of {LOG_LEVELS}"))

    # -- derived values --------------------------------------------------------------------

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * MIB)

    @property
    def max_adapter_unpacked_bytes(self) -> int:
        return int(self.max_adapter_unpacked_mb * MIB)

    def base_model_id(self) -> str:
        """The id the base model is served as, known without loading it: --served-model-name,
        else the model folder's name (loraforge-demo for the embedded default model)."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).resolve().name if self.model else DEMO_MODEL_ID

    def ensure_dirs(self) -> None:
        """Create the data folder and its files/, adapters/, jobs/ subfolders if missing."""
        for path in (self.data_dir, self.files_dir, self.adapters_dir, self.jobs_dir):
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SettingsError(
                    f"cannot create {path}: {e.strerror} — pass a writable folder with "
                    f"--data-dir or {ENV_PREFIX}DATA_DIR"
                ) from e

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `overrides` (explicit flags; None = not given) > env vars > defaults.

        `env` defaults to os.environ; tests pass a dict. An empty env value counts as unset.
        Raises SettingsError for an env value that does not parse, naming the variable and what
        to write instead.
        """
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown settings {unknown}: known are {sorted(names)}")
        values: dict[str, Any] = {}
        for name in names:
            if overrides.get(name) is not None:
                values[name] = overrides[name]
            elif text := env.get(env_var(name)):  # empty (`LORAFORGE_X=`) means unset
                values[name] = _parse(text, hints[name], name)
        return cls(**values)

    @classmethod
    def from_args(cls, ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from a namespace parsed with `add_arguments` (other attributes are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
        return cls.from_env(env, **given)

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, names: Iterable[str] | None = None
    ) -> None:
        """Add `--flag` options for the given settings (all by default) to an argparse parser.

        Every flag defaults to None, meaning "not given", so `from_args` can let the env var or
        the default decide; the help text shows both.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields if names is None else names:
            f = fields[name]
            base = _base_type(hints[name])
            default = "unset" if f.default is None else f.default
            if name == "database_url":
                default = "sqlite under --data-dir"
            help = f"{f.metadata['help']} [env {env_var(name)}; default {default}]"
            flag = "--" + name.replace("_", "-")
            if base is bool:
                parser.add_argument(
                    flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help
                )
            else:
                choices = f.metadata.get("choices")
                parser.add_argument(
                    flag,
                    dest=name,
                    type=base,
                    default=None,
                    help=help,
                    choices=choices,
                    metavar=None if choices else name.upper(),
                )


def env_var(name: str) -> str:
    """The env twin of a setting: `max_num_seqs` -> `LORAFORGE_MAX_NUM_SEQS`."""
    return ENV_PREFIX + name.upper()


def _bad(name: str, value: object, fix: str) -> str:
    flag = "--" + name.replace("_", "-")
    return f"{flag} / {env_var(name)} = {value!r} is not usable: {fix}"


def _base_type(hint: Any) -> type:
    # `int | None` -> int; the annotations here are all "T" or "T | None".
    if isinstance(hint, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(text: str, hint: Any, name: str) -> Any:
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    base = _base_type(hint)
    text = text.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    if base is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise SettingsError(
            f"{env_var(name)}={text!r} is not a boolean: set it to 1/true/yes or 0/false/no"
        )
    try:
        return base(text)
    except ValueError:
        what = {int: "a whole number", float: "a number"}.get(base, base.__name__)
        raise SettingsError(
            f"{env_var(name)}={text!r} is not {what}: fix it or unset it to use the default"
        ) from None
