"""The one base of every failure a user can fix, and the engine's request errors.

Each engine module raises its own subclass (`WeightsError`, `DataFormatError`, ...) whose message
says what went wrong and what to do next; the CLI prints any `LoraforgeError` as one line and the
server maps `EngineError.kind` to an HTTP status without reading the message.
"""

from __future__ import annotations

from typing import Literal


class LoraforgeError(Exception):
    """A failure the user can fix; `str(e)` is one line that says what to do next."""


# context_length -> 400 context_length_exceeded; invalid_* -> 400; busy -> 429 (retry);
# not_found -> 404 (an adapter deleted after the request named it).
EngineErrorKind = Literal[
    "context_length", "invalid_prompt", "invalid_request", "busy", "not_found"
]


class EngineError(LoraforgeError, ValueError):
    """A generation request the engine cannot serve; `param` names the request field at fault."""

    def __init__(
        self, message: str, *, kind: EngineErrorKind = "invalid_request", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind: EngineErrorKind = kind
        self.param = param


def is_user_error(e: BaseException) -> bool:
    """True for failures that describe bad input or a missing file (they already say what to do)."""
    return isinstance(e, LoraforgeError | FileNotFoundError)
