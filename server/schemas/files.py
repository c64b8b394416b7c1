"""/v1/files shapes."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct


class FileObject(Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(Struct, kw_only=True):
    data: list[FileObject]
    object: Literal["list"] = "list"
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class DeletedObject(Struct):
    """OpenAI's answer to a DELETE: `{"id", "object": "file" | "model" | ..., "deleted"}`."""

    id: str
    object: str
    deleted: bool = True
