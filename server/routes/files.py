"""The Files API: upload, list, retrieve, download and delete JSONL training files.

An upload is streamed straight to `<data_dir>/files/.<id>.part` chunk by chunk (never held in
memory), counted against --max-upload-mb as it arrives, validated line by line, then renamed to
`<id>.jsonl` and only then recorded in the database. So a row always means a complete, valid file;
a refused or interrupted upload leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
from litestar import Request, delete, get, post
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import File
from sqlalchemy import select
from sqlalchemy.orm import Session

from mlx_core.data.formats import check_jsonl_file
from server.bodies import MULTIPART, accepts
from server.db import Database, FineTuningJob, UploadedFile, new_id
from server.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    ServerError,
)
from server.replicas.storage import publish_file
from server.routes.dependencies import Injected
from server.routes.openapi import JSON_BODY, api_errors
from server.schemas.files import DeletedObject, FileList, FileObject
from server.settings import Settings
from server.uploads import receive_upload

SUPPORTED_PURPOSES = ("fine-tune",)
MAX_ERRORS_SHOWN = 5
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running")


def file_object(row: UploadedFile) -> FileObject:
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


# -- routes --------------------------------------------------------------------------------------


def _check_file_field(name: str, value: str | None) -> None:
    if name.startswith("expires_after"):
        raise BadRequestError(
            "expires_after is not supported by loraforge: remove it (files are kept until you "
            "delete them).",
            param="expires_after",
        )
    if name == "purpose" and value is not None and value not in SUPPORTED_PURPOSES:
        raise BadRequestError(
            f"purpose {value!r} is not supported by loraforge: use purpose='fine-tune' "
            "(training data is the only kind of file it uses).",
            param="purpose",
        )


@dataclass
class _UploadOperation(Operation):
    # The handler reads the multipart stream itself, so describe the form for /openapi.json.
    def __post_init__(self) -> None:
        form = Schema(
            type=OpenAPIType.OBJECT,
            properties={
                "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
                "purpose": Schema(type=OpenAPIType.STRING, enum=list(SUPPORTED_PURPOSES)),
            },
            required=["file", "purpose"],
        )
        self.request_body = RequestBody(
            content={"multipart/form-data": OpenAPIMediaType(schema=form)}, required=True
        )


@post(
    "/v1/files",
    status_code=200,
    request_max_body_size=None,  # receive_upload counts against --max-upload-mb instead
    tags=["files"],
    responses=api_errors(*JSON_BODY),
    opt=accepts(MULTIPART),
    operation_class=_UploadOperation,
)
async def create_file(
    request: Request[Any, Any, Any], settings: Injected[Settings], db: Injected[Database]
) -> FileObject:
    """Upload a JSONL file (multipart: `file`, `purpose="fine-tune"`); it is validated first."""
    file_id = new_id("file")
    part_path = settings.files_dir / f".{file_id}.part"
    final_path = settings.files_dir / f"{file_id}.jsonl"
    try:
        upload = await receive_upload(
            request,
            part_path,
            settings.max_upload_bytes,
            settings,
            text_fields=("purpose",),
            check_field=_check_file_field,
        )
        if upload.filename is None:
            raise BadRequestError("The form has no `file` field: attach the file.", param="file")
        if "purpose" not in upload.fields:
            raise BadRequestError(
                "Missing required parameter: 'purpose'. Use purpose='fine-tune'.", param="purpose"
            )
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
        # Renamed only once complete and on disk: a replica sharing the data dir that sees
        # files/<id>.jsonl sees all of it.
        await anyio.to_thread.run_sync(publish_file, part_path, final_path)
        row = UploadedFile(
            id=file_id,
            filename=upload.filename,
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
        return file_object(row)
    finally:
        part_path.unlink(missing_ok=True)


@get("/v1/files", tags=["files"], responses=api_errors(400))
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
            newer_or_older = UploadedFile.id < after if order == "desc" else UploadedFile.id > after
            stmt = stmt.where(newer_or_older)
        by_id = UploadedFile.id.desc() if order == "desc" else UploadedFile.id.asc()
        return list(session.scalars(stmt.order_by(by_id).limit(limit + 1)))

    rows = await db.run(query)
    data = [file_object(row) for row in rows[:limit]]
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


@get("/v1/files/{file_id:str}", tags=["files"], responses=api_errors(404))
async def retrieve_file(db: Injected[Database], file_id: FromPath[str]) -> FileObject:
    """One file's metadata."""
    return file_object(await _get_row(db, file_id))


@dataclass
class _DownloadOperation(Operation):
    # Litestar documents Last-Modified as an ISO date-time; HTTP sends an HTTP-date
    # ("Tue, 01 Dec 2026 15:53:44 GMT", RFC 9110), so a client checking the header would fail.
    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        headers = ok.headers if isinstance(ok, OpenAPIResponse) else None
        header = (headers or {}).get("last-modified")
        if isinstance(header, OpenAPIHeader) and isinstance(header.schema, Schema):
            header.schema.format = None
            header.description = "when the file was written, as an HTTP-date (RFC 9110)"


@get(
    "/v1/files/{file_id:str}/content",
    tags=["files"],
    media_type="application/octet-stream",
    responses=api_errors(404),
    operation_class=_DownloadOperation,
)
async def file_content(db: Injected[Database], file_id: FromPath[str]) -> File:
    """The file's bytes, streamed from disk."""
    row = await _get_row(db, file_id)
    if not Path(row.path).is_file():
        raise ServerError(
            f"The content of {file_id} is missing from the server's data folder. Delete the file "
            "and upload it again."
        )
    return File(path=row.path, filename=row.filename, media_type="application/octet-stream")


@delete("/v1/files/{file_id:str}", status_code=200, tags=["files"], responses=api_errors(404, 409))
async def delete_file(db: Injected[Database], file_id: FromPath[str]) -> DeletedObject:
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
    return DeletedObject(id=file_id, object="file")


route_handlers = [create_file, list_files, retrieve_file, file_content, delete_file]
