"""The Files API: upload, list, retrieve, download and delete JSONL training files.

An upload is streamed straight to `<data_dir>/files/.<id>.part` chunk by chunk (never held in
memory), counted against --max-upload-mb as it arrives, validated line by line, then renamed to
`<id>.jsonl` and only then recorded in the database. So a row always means a complete, valid file;
a refused or interrupted upload leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
from anyio import AsyncFile
from litestar import Request, delete, get, post
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import File
from multipart import (  # type: ignore[import-untyped]
    MultipartSegment,
    ParserError,
    ParserLimitReached,
    PushMultipartParser,
    parse_options_header,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from mlx_core.examples import check_jsonl_file
from server.db import Database, FineTuningJob, UploadedFile, new_id
from server.errors import (
    APIError,
    BadRequestError,
    ConflictError,
    NotFoundError,
    RequestTooLargeError,
    ServerError,
)
from server.routes import Injected
from server.schemas import FileDeleted, FileList, FileObject
from server.settings import Settings

SUPPORTED_PURPOSES = ("fine-tune",)
MAX_ERRORS_SHOWN = 5
# Form framing around the file (boundaries, part headers, the purpose field) in a request whose
# file is exactly at the limit.
MULTIPART_SLACK_BYTES = 64 * 1024
MAX_TEXT_FIELD_BYTES = 1024
# After refusing an upload mid-stream, read and discard up to this much of the rest: a client
# still sending when the server closes gets a connection reset instead of our error message.
DRAIN_MAX_BYTES = 1 << 30
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")


def _file_object(row: UploadedFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
        status="processed",
    )


def _not_found(file_id: str) -> NotFoundError:
    return NotFoundError(
        f"No such File object: {file_id}. List your files with GET /v1/files.", param="file_id"
    )


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
    return name[:255] or "upload.jsonl"


class _Upload:
    """The state of one multipart upload being parsed: the file part goes to `part_path`."""

    def __init__(self, part_path: Path, limit: int) -> None:
        self.part_path = part_path
        self.limit = limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self._out: AsyncFile[bytes] | None = None
        self._segment: MultipartSegment | None = None
        self._text = bytearray()

    async def feed(self, event: MultipartSegment | bytes | None, settings: Settings) -> None:
        if isinstance(event, MultipartSegment):
            self._start(event)
            if event.name == "file":
                self._out = await anyio.open_file(self.part_path, "wb")
        elif event:
            await self._data(event, settings)
        else:
            await self._end()

    def _start(self, segment: MultipartSegment) -> None:
        name = segment.name or ""
        if name == "file":
            if self.filename is not None:
                raise BadRequestError("Send one file per request.", param="file")
            self.filename = _clean_filename(segment.filename)
        elif name.startswith("expires_after"):
            raise BadRequestError(
                "expires_after is not supported by loraforge: remove it (files are kept until "
                "you delete them).",
                param="expires_after",
            )
        elif name != "purpose":
            raise BadRequestError(
                f"Unrecognized form field: {name!r}. Send only `file` and `purpose`.", param=name
            )
        self._segment = segment

    async def _data(self, chunk: bytes, settings: Settings) -> None:
        if self._out is not None:
            self.size += len(chunk)
            if self.size > self.limit:
                raise _too_large(settings)
            await self._out.write(chunk)
            return
        self._text += chunk
        if len(self._text) > MAX_TEXT_FIELD_BYTES:
            name = self._segment.name if self._segment else "?"
            raise BadRequestError(f"The form field {name!r} is too long.", param=name)

    async def _end(self) -> None:
        if self._out is not None:
            await self._out.flush()
            # On disk before the rename makes it visible: a crash cannot leave a torn file.
            await anyio.to_thread.run_sync(os.fsync, self._out.wrapped.fileno())
            await self._out.aclose()
            self._out = None
        elif self._segment is not None:
            purpose = self._text.decode("utf-8", errors="replace").strip()
            if purpose not in SUPPORTED_PURPOSES:
                # Checked here, before the file is read, when the client sends purpose first.
                raise BadRequestError(
                    f"purpose {purpose!r} is not supported by loraforge: use "
                    "purpose='fine-tune' (training data is the only kind of file it uses).",
                    param="purpose",
                )
            self.fields["purpose"] = purpose
        self._segment = None
        self._text = bytearray()

    async def close(self) -> None:
        if self._out is not None:
            await self._out.aclose()
            self._out = None


async def _receive(request: Request[Any, Any, Any], settings: Settings, upload: _Upload) -> None:
    """Parse the multipart body into `upload`, streaming; raises an APIError if it is unusable."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get("boundary")
    if content_type != "multipart/form-data" or not boundary:
        raise BadRequestError(
            "Send the file as multipart/form-data with the fields `file` and `purpose` (the "
            "openai SDK's client.files.create does this; with curl: -F purpose=fine-tune "
            "-F file=@train.jsonl).",
            param="file",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > upload.limit + MULTIPART_SLACK_BYTES:
        raise _too_large(settings)  # before reading a byte
    try:
        with PushMultipartParser(boundary, max_segment_count=8) as parser:
            async for chunk in request.stream():
                for event in parser.parse(chunk):
                    await upload.feed(event, settings)
    except (ParserError, ParserLimitReached) as e:
        raise BadRequestError(
            f"The multipart body is malformed ({e}). Let your HTTP client build it (e.g. the "
            "openai SDK, or curl -F).",
            param="file",
        ) from None
    if upload.filename is None:
        raise BadRequestError("The form has no `file` field: attach the file.", param="file")
    if "purpose" not in upload.fields:
        raise BadRequestError(
            "Missing required parameter: 'purpose'. Use purpose='fine-tune'.", param="purpose"
        )


async def _drain(request: Request[Any, Any, Any]) -> None:
    left = DRAIN_MAX_BYTES
    try:
        async for chunk in request.stream():
            left -= len(chunk)
            if left < 0:
                return
    except Exception:  # disconnected, or already consumed: nothing left to drain
        return


@post("/v1/files", status_code=200, request_max_body_size=None, tags=["files"])
async def create_file(
    request: Request[Any, Any, Any], settings: Injected[Settings], db: Injected[Database]
) -> FileObject:
    """Upload a JSONL file (multipart: `file`, `purpose="fine-tune"`); it is validated first."""
    file_id = new_id("file")
    part_path = settings.files_dir / f".{file_id}.part"
    final_path = settings.files_dir / f"{file_id}.jsonl"
    # The body limit is ours to enforce here (the route has none), so it can say "the file".
    upload = _Upload(part_path, settings.max_upload_bytes)
    try:
        try:
            await _receive(request, settings, upload)
        except APIError:
            await _drain(request)
            raise
        finally:
            await upload.close()
        n_examples, errors = await anyio.to_thread.run_sync(
            lambda: check_jsonl_file(part_path, max_errors=MAX_ERRORS_SHOWN)
        )
        if errors:
            shown = "\n".join(errors)
            raise BadRequestError(
                f"{upload.filename} is not valid fine-tuning data (first problems shown, by "
                f"line):\n{shown}\nFix these lines and upload the file again.",
                param="file",
                code="invalid_file_format",
            )
        os.replace(part_path, final_path)
        row = UploadedFile(
            id=file_id,
            filename=upload.filename or "upload.jsonl",
            purpose=upload.fields["purpose"],
            bytes=upload.size,
            path=str(final_path),
            status="processed",
            n_examples=n_examples,
        )

        def insert(session: Session) -> UploadedFile:
            session.add(row)
            return row

        try:
            await db.run(insert)
        except BaseException:
            final_path.unlink(missing_ok=True)
            raise
        return _file_object(row)
    finally:
        part_path.unlink(missing_ok=True)


@get("/v1/files", tags=["files"])
async def list_files(
    db: Injected[Database],
    purpose: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=10000)] = 10000,
    order: FromQuery[Literal["asc", "desc"]] = "desc",
    after: Annotated[str | None, QueryParameter(description="list files after this id")] = None,
) -> FileList:
    """Uploaded files, newest first (`order=asc` for oldest first), optionally by `purpose`."""

    def query(session: Session) -> list[UploadedFile]:
        stmt = select(UploadedFile)
        if purpose is not None:
            stmt = stmt.where(UploadedFile.purpose == purpose)
        # Ids start with their creation time, so id order is age order (and a stable cursor).
        if after is not None:
            stmt = stmt.where(UploadedFile.id < after if order == "desc" else UploadedFile.id > after)
        by_id = UploadedFile.id.desc() if order == "desc" else UploadedFile.id.asc()
        return list(session.scalars(stmt.order_by(by_id).limit(limit + 1)))

    rows = await db.run(query)
    data = [_file_object(row) for row in rows[:limit]]
    return FileList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(rows) > limit,
    )


async def _get_row(db: Database, file_id: str) -> UploadedFile:
    row = await db.run(lambda session: session.get(UploadedFile, file_id))
    if row is None:
        raise _not_found(file_id)
    return row


@get("/v1/files/{file_id:str}", tags=["files"])
async def retrieve_file(db: Injected[Database], file_id: FromPath[str]) -> FileObject:
    """One file's metadata."""
    return _file_object(await _get_row(db, file_id))


@get("/v1/files/{file_id:str}/content", tags=["files"])
async def file_content(db: Injected[Database], file_id: FromPath[str]) -> File:
    """The file's bytes, streamed from disk."""
    row = await _get_row(db, file_id)
    if not Path(row.path).is_file():
        raise ServerError(
            f"The content of {file_id} is missing from the server's data folder. Delete the file "
            "and upload it again."
        )
    return File(path=row.path, filename=row.filename, media_type="application/octet-stream")


@delete("/v1/files/{file_id:str}", status_code=200, tags=["files"])
async def delete_file(db: Injected[Database], file_id: FromPath[str]) -> FileDeleted:
    """Delete the file and its row; refused (409) while a queued or running job needs it."""

    def remove(session: Session) -> UploadedFile | None:
        row = session.get(UploadedFile, file_id)
        if row is None:
            return None
        uses = (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id)
        active = FineTuningJob.status.in_(ACTIVE_JOB_STATUSES)
        job = session.scalars(select(FineTuningJob.id).where(uses, active).limit(1)).first()
        if job is not None:
            raise ConflictError(
                f"{file_id} is used by fine-tuning job {job}, which has not finished. Cancel "
                f"the job (POST /v1/fine_tuning/jobs/{job}/cancel) or wait for it, then delete.",
                param="file_id",
                code="file_in_use",
            )
        session.delete(row)
        return row

    row = await db.run(remove)
    if row is None:
        raise _not_found(file_id)
    # After the commit: a crash here leaves an orphan file no row points to, never the reverse.
    Path(row.path).unlink(missing_ok=True)
    return FileDeleted(id=file_id)


route_handlers = [create_file, list_files, retrieve_file, file_content, delete_file]
