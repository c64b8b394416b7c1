"""Streaming multipart uploads: the `file` part goes to disk chunk by chunk, never into memory,
counted against a limit as it arrives; short text fields are collected alongside. Used by the
Files API and adapter uploads."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import anyio
import anyio.to_thread
from anyio import AsyncFile
from litestar import Request
from multipart import (
    MultipartSegment,
    ParserError,
    ParserLimitReached,
    PushMultipartParser,
    parse_options_header,
)

from server.errors import APIError, BadRequestError, RequestTooLargeError
from server.settings import Settings

# Form framing around the file (boundaries, part headers, the purpose field) in a request whose
# file is exactly at the limit.
MULTIPART_SLACK_BYTES = 64 * 1024
MAX_TEXT_FIELD_BYTES = 1024
# After refusing an upload mid-stream, read and discard up to this much of the rest: a client
# still sending when the server closes gets a connection reset instead of our error message.
DRAIN_MAX_BYTES = 1 << 30


def _too_large(settings: Settings) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"The file is larger than this server's upload limit of {settings.max_upload_mb:g} MB. "
        "Split it into smaller files, or restart the server with a larger --max-upload-mb "
        "(env LORAFORGE_MAX_UPLOAD_MB).",
        param="file",
        code="file_too_large",
    )


def _clean_filename(raw: str | None) -> str:
    # Browsers may send "C:\fakepath\x.jsonl"; keep the base name only, as a label.
    name = PureWindowsPath(PurePosixPath(raw or "").name).name.strip()
    return name[:255] or "upload"


@dataclass
class Upload:
    filename: str | None = None  # None: the form had no `file` part
    size: int = 0  # bytes of the file part
    fields: dict[str, str] = field(default_factory=dict)


class _Body:
    """The request body as chunks straight from ASGI, remembering whether it has ended.

    Read directly (upload routes have no Litestar body limit: `receive_upload` enforces ours)
    because after an early refusal the rest must be drained, and only this reader knows whether
    any is left: waiting for more of an ended body would wait until the client gives up.
    """

    def __init__(self, request: Request[Any, Any, Any]) -> None:
        self._receive = request.receive
        self.ended = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.ended:
            message = await self._receive()
            # An HTTP route receives only http.request and http.disconnect.
            if message["type"] != "http.request":
                self.ended = True
                raise BadRequestError("The upload was interrupted: send the file again.")
            self.ended = not message.get("more_body", False)
            if message.get("body"):
                yield message["body"]

    async def drain(self) -> None:
        """Read and discard what is left (up to DRAIN_MAX_BYTES) so the client reads our error."""
        left = DRAIN_MAX_BYTES
        try:
            async for chunk in self.chunks():
                left -= len(chunk)
                if left < 0:
                    return
        except BadRequestError:
            return


FieldCheck = Callable[[str, str | None], None]


async def _parse_form(
    body: _Body,
    boundary: str,
    part_path: Path,
    limit: int,
    settings: Settings,
    text_fields: Collection[str],
    check_field: FieldCheck,
) -> Upload:
    upload = Upload()
    out: AsyncFile[bytes] | None = None
    name: str | None = None
    text = bytearray()
    try:
        with PushMultipartParser(boundary, max_segment_count=len(text_fields) + 4) as parser:
            async for chunk in body.chunks():
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):  # a part starts
                        name = event.name or ""
                        check_field(name, None)
                        if name == "file":
                            if upload.filename is not None:
                                raise BadRequestError("Send one file per request.", param="file")
                            upload.filename = _clean_filename(event.filename)
                            out = await anyio.open_file(part_path, "wb")
                        elif name not in text_fields:
                            expected = ", ".join(["file", *text_fields])
                            raise BadRequestError(
                                f"Unrecognized form field: {name!r}. Send only {expected}.",
                                param=name,
                            )
                    elif event and out is not None:  # file bytes
                        upload.size += len(event)
                        if upload.size > limit:
                            raise _too_large(settings)
                        await out.write(event)
                    elif event:  # text field bytes
                        text += event
                        if len(text) > MAX_TEXT_FIELD_BYTES:
                            raise BadRequestError(f"Form field {name!r} is too long.", param=name)
                    elif out is not None:  # the file part ends
                        await out.flush()
                        # On disk before any rename makes it visible: no torn files after a crash.
                        await anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
                        await out.aclose()
                        out = None
                    elif name is not None:  # a text part ends
                        value = text.decode("utf-8", errors="replace").strip()
                        check_field(name, value)  # e.g. a wrong purpose, before the file is read
                        upload.fields[name] = value
                        text = bytearray()
    except (ParserError, ParserLimitReached) as e:
        raise BadRequestError(
            f"The multipart body is malformed ({e}). Let your HTTP client build it (e.g. the "
            "openai SDK, or curl -F).",
            param="file",
        ) from None
    finally:
        if out is not None:
            await out.aclose()
    return upload


def _accept_any(_name: str, _value: str | None) -> None:
    return None


async def receive_upload(
    request: Request[Any, Any, Any],
    part_path: Path,
    limit: int,
    settings: Settings,
    *,
    text_fields: Collection[str] = (),
    check_field: FieldCheck = _accept_any,
) -> Upload:
    """Stream a multipart/form-data body: the `file` part to `part_path`, at most `limit` bytes
    (else 413), and the `text_fields` into `Upload.fields`.

    Memory use is one chunk whatever the size. `check_field(name, None)` runs as each part
    starts and `check_field(name, value)` as each text part ends, so a route can refuse early.
    On any refusal the rest of the body is drained first, so the client reads the error. The
    caller owns `part_path` (delete it when done). The route must set request_max_body_size=None.
    """
    body = _Body(request)
    try:
        content_type, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get("boundary")
        if content_type != "multipart/form-data" or not boundary:
            fields = "".join(f" -F {name}=..." for name in text_fields)
            raise BadRequestError(
                f"Send the upload as multipart/form-data with the fields file, "
                f"{', '.join(text_fields)} (with curl:{fields} -F file=@PATH).",
                param="file",
            )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK_BYTES:
            raise _too_large(settings)  # before reading a byte of it
        return await _parse_form(
            body, boundary, part_path, limit, settings, text_fields, check_field
        )
    except APIError:
        await body.drain()
        raise
