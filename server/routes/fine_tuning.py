"""Fine-tuning jobs: OpenAI's /v1/fine_tuning/jobs API and the legacy /v1/fine-tunes API.

Both speak about the same rows: a job created either way is visible both ways. The new API shows
a job as `ftjob-<hex>`, the legacy one as `ft-<hex>` (same hex); either id works in every route.
Legacy statuses: validating_files and queued read as `pending`.
The work itself is in server.jobs.queue (validation, queue), server.jobs.spec (settings) and
server.jobs.worker (training); these handlers only translate.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.types import ControllerRouterHandler
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db import Database, FineTuningJob, JobCheckpoint, JobEvent, UploadedFile
from server.errors import BadRequestError
from server.jobs import queue as jobs
from server.jobs.spec import JobRequest, job_hyperparameters, job_lora
from server.openai_serving import reject_unsupported
from server.routes.dependencies import Injected
from server.routes.files import file_object
from server.routes.openapi import JSON_BODY, api_errors
from server.schemas.fine_tuning import (
    CheckpointMetrics,
    FineTuneMethod,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobCreateBody,
    FineTuningJobError,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    FineTuningJobObject,
    Hyperparameters,
    LoraOptions,
    SupervisedMethod,
)
from server.schemas.legacy import (
    FineTune,
    FineTuneCreateBody,
    FineTuneEvent,
    FineTuneEventList,
    FineTuneHyperparams,
    FineTuneList,
)
from server.settings import Settings

EVENT_PREFIX = "ftevent-"
LEGACY_STATUS = {"validating_files": "pending", "queued": "pending"}
Limit = Annotated[int, QueryParameter(ge=1, le=100, description="how many to return (1-100)")]
After = Annotated[
    str | None, QueryParameter(description="the id of the last item of the previous page")
]
JobId = FromPath[str]


# -- row -> API object --------------------------------------------------------------------------
def _hyperparameters(job: FineTuningJob) -> Hyperparameters:
    hp = job_hyperparameters(job)
    return Hyperparameters(
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
    )


def job_object(job: FineTuningJob) -> FineTuningJobObject:
    hp = _hyperparameters(job)
    return FineTuningJobObject(
        id=job.id,
        created_at=job.created_at,
        finished_at=job.finished_at,
        model=job.model,
        error=msgspec.convert(job.error, FineTuningJobError) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        hyperparameters=hp,
        seed=job.seed,
        result_files=list(job.result_files),
        status=job.status,  # type: ignore[arg-type]
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=job.estimated_finish,
        method=FineTuneMethod(type="supervised", supervised=SupervisedMethod(hyperparameters=hp)),
        suffix=job.suffix,
        lora=job_lora(job),
    )


def _event_object(row: JobEvent) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=f"{EVENT_PREFIX}{row.id}",
        created_at=row.created_at,
        level=row.level,  # type: ignore[arg-type]  # the column's CHECK allows only these
        message=row.message,
        data=row.data,
        type=row.type,  # type: ignore[arg-type]  # "message" | "metrics", as add_event writes
    )


def _checkpoint_object(row: JobCheckpoint, job: FineTuningJob) -> FineTuningJobCheckpoint:
    m = row.metrics
    return FineTuningJobCheckpoint(
        id=row.id,
        created_at=row.created_at,
        fine_tuning_job_id=job.id,
        step_number=row.step,
        fine_tuned_model_checkpoint=f"{jobs.fine_tuned_model_name(job)}:ckpt-step-{row.step}",
        metrics=CheckpointMetrics(
            step=float(row.step), train_loss=m.get("train_loss"), valid_loss=m.get("valid_loss")
        ),
    )


def _legacy_object(job: FineTuningJob, session: Session) -> FineTune:
    ids = [job.training_file, job.validation_file, *job.result_files]
    files = {
        f.id: file_object(f)
        for f in session.scalars(
            select(UploadedFile).where(UploadedFile.id.in_([i for i in ids if i]))
        )
    }
    events = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job.id, JobEvent.type == "message")
        .order_by(JobEvent.id)
    ).all()
    hp = job_hyperparameters(job)
    return FineTune(
        id=jobs.legacy_id(job.id),
        model=job.model,
        created_at=job.created_at,
        updated_at=job.updated_at,
        fine_tuned_model=job.fine_tuned_model,
        status=LEGACY_STATUS.get(job.status, job.status),  # type: ignore[arg-type]
        events=[
            FineTuneEvent(created_at=e.created_at, level=e.level, message=e.message) for e in events
        ],
        # The trainer learns the prompt fully or not at all: the weight that is in effect.
        hyperparams=FineTuneHyperparams(
            n_epochs=hp.n_epochs,
            batch_size=hp.batch_size,
            learning_rate_multiplier=hp.learning_rate_multiplier,
            prompt_loss_weight=0.0 if job_lora(job).mask_prompt else 1.0,
        ),
        training_files=[files[i] for i in [job.training_file] if i in files],
        validation_files=[files[i] for i in [job.validation_file] if i in files],
        result_files=[files[i] for i in job.result_files if i in files],
    )


def _cursor(after: str | None, prefix: str) -> int | None:
    if after is None:
        return None
    number = after.removeprefix(prefix)
    if not number.isdigit():
        raise BadRequestError(
            f"after={after!r} is not an id from this list: pass the `id` of the "
            "last item of the previous page.",
            param="after",
        )
    return int(number)


# -- /v1/fine_tuning/jobs -----------------------------------------------------------------------
@post(
    "/v1/fine_tuning/jobs",
    status_code=200,
    tags=["fine-tuning"],
    responses=api_errors(*JSON_BODY, 404),
)
async def create_job(
    data: JSONBody[FineTuningJobCreateBody], settings: Injected[Settings], db: Injected[Database]
) -> FineTuningJobObject:
    """Create a fine-tuning job from an uploaded training file; it is queued at once.
    loraforge's LoRA settings go in `lora` (openai SDK: `extra_body={"lora": {...}}`)."""
    reject_unsupported(data)
    hp = data.hyperparameters
    if data.method is not None:
        if data.method.type != "supervised":
            raise BadRequestError(
                f"method.type {data.method.type!r} is not supported by "
                'loraforge: use "supervised" (LoRA on your examples).',
                param="method.type",
                code="unsupported_parameter",
            )
        reject_unsupported(data.method)
        if data.method.supervised and data.method.supervised.hyperparameters:
            if hp is not None:
                raise BadRequestError(
                    "hyperparameters are given twice (top level and "
                    "method.supervised): keep only method.supervised's.",
                    param="hyperparameters",
                )
            hp = data.method.supervised.hyperparameters
    hp = hp or Hyperparameters()
    request = JobRequest(
        model=data.model,
        training_file=data.training_file,
        validation_file=data.validation_file,
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        lora=data.lora or LoraOptions(),
        suffix=data.suffix,
        seed=data.seed,
    )
    return job_object(await db.run(lambda s: jobs.create_job(s, settings, request)))


@get("/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=api_errors(400))
async def list_jobs(
    db: Injected[Database], after: After = None, limit: Limit = 20
) -> FineTuningJobList:
    """Jobs, newest first; page with `after` (the last id of the previous page)."""

    def query(session: Session) -> list[FineTuningJob]:
        stmt = select(FineTuningJob)
        if after is not None:  # ids start with their creation time: id order is age order
            stmt = stmt.where(FineTuningJob.id < jobs.job_id_from(after))
        return list(session.scalars(stmt.order_by(FineTuningJob.id.desc()).limit(limit + 1)))

    rows = await db.run(query)
    return FineTuningJobList([job_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


@get(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id:str}", tags=["fine-tuning"], responses=api_errors(404)
)
async def retrieve_job(db: Injected[Database], fine_tuning_job_id: JobId) -> FineTuningJobObject:
    return job_object(await db.run(lambda s: jobs.get_job(s, fine_tuning_job_id)))


@post(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/cancel",
    status_code=200,
    tags=["fine-tuning"],
    responses=api_errors(404, 409),
)
async def cancel_job(db: Injected[Database], fine_tuning_job_id: JobId) -> FineTuningJobObject:
    """Cancel a queued or running job (its trainer stops within seconds); 409 once finished."""
    return job_object(await db.run(lambda s: jobs.cancel_job(s, fine_tuning_job_id)))


@get(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/events",
    tags=["fine-tuning"],
    responses=api_errors(400, 404),
)
async def list_events(
    db: Injected[Database], fine_tuning_job_id: JobId, after: After = None, limit: Limit = 20
) -> FineTuningJobEventList:
    """The job's events, newest first: messages, and `metrics` events with losses in `data`."""
    before = _cursor(after, EVENT_PREFIX)

    def query(session: Session) -> list[JobEvent]:
        job = jobs.get_job(session, fine_tuning_job_id)
        stmt = select(JobEvent).where(JobEvent.job_id == job.id)
        if before is not None:
            stmt = stmt.where(JobEvent.id < before)
        return list(session.scalars(stmt.order_by(JobEvent.id.desc()).limit(limit + 1)))

    rows = await db.run(query)
    return FineTuningJobEventList(
        [_event_object(r) for r in rows[:limit]], has_more=len(rows) > limit
    )


@get(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/checkpoints",
    tags=["fine-tuning"],
    responses=api_errors(400, 404),
)
async def list_checkpoints(
    db: Injected[Database], fine_tuning_job_id: JobId, after: After = None, limit: Limit = 10
) -> FineTuningJobCheckpointList:
    """The job's checkpoints, newest first. Each is an adapter folder on the server (`path` in
    the data dir): POST /v1/adapters {"name", "path"} serves one."""

    def query(session: Session) -> tuple[FineTuningJob, list[JobCheckpoint]]:
        job = jobs.get_job(session, fine_tuning_job_id)
        stmt = select(JobCheckpoint).where(JobCheckpoint.job_id == job.id)
        if after is not None:
            last = session.get(JobCheckpoint, after)
            if last is None:
                raise BadRequestError(
                    f"after={after!r} is not a checkpoint of this job: pass "
                    "the `id` of the last item of the previous page.",
                    param="after",
                )
            stmt = stmt.where(JobCheckpoint.step < last.step)
        rows = session.scalars(stmt.order_by(JobCheckpoint.step.desc()).limit(limit + 1))
        return job, list(rows)

    job, rows = await db.run(query)
    data = [_checkpoint_object(r, job) for r in rows[:limit]]
    return FineTuningJobCheckpointList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


# -- legacy /v1/fine-tunes (and /fine-tunes) ----------------------------------------------------
LEGACY = ("/v1/fine-tunes", "/fine-tunes")


def _paths(suffix: str = "") -> list[str]:
    return [f"{root}{suffix}" for root in LEGACY]


async def legacy_create(
    data: JSONBody[FineTuneCreateBody], settings: Injected[Settings], db: Injected[Database]
) -> FineTune:
    """Create a fine-tune (legacy API; the job also appears in /v1/fine_tuning/jobs)."""
    reject_unsupported(data)
    request = JobRequest(
        model=data.model,
        training_file=data.training_file,
        validation_file=data.validation_file,
        n_epochs=data.n_epochs,
        batch_size=data.batch_size or "auto",
        learning_rate_multiplier=data.learning_rate_multiplier or "auto",
        lora=data.lora or LoraOptions(),
        suffix=data.suffix,
        seed=None,
        api="fine-tunes",
        prompt_loss_weight=data.prompt_loss_weight,
    )

    def create(session: Session) -> FineTune:
        return _legacy_object(jobs.create_job(session, settings, request), session)

    return await db.run(create)


async def legacy_list(db: Injected[Database]) -> FineTuneList:
    """Every fine-tune, newest first (legacy API)."""

    def query(session: Session) -> list[FineTune]:
        rows = session.scalars(select(FineTuningJob).order_by(FineTuningJob.id.desc()))
        return [_legacy_object(job, session) for job in rows]

    return FineTuneList(await db.run(query))


async def legacy_retrieve(db: Injected[Database], fine_tune_id: FromPath[str]) -> FineTune:
    return await db.run(lambda s: _legacy_object(jobs.get_job(s, fine_tune_id), s))


async def legacy_cancel(db: Injected[Database], fine_tune_id: FromPath[str]) -> FineTune:
    return await db.run(lambda s: _legacy_object(jobs.cancel_job(s, fine_tune_id), s))


async def legacy_events(
    db: Injected[Database], fine_tune_id: FromPath[str], stream: FromQuery[bool] = False
) -> FineTuneEventList:
    """The fine-tune's events, oldest first (legacy API)."""
    if stream:
        raise BadRequestError(
            "stream=true is not supported by loraforge: poll this route, or "
            "GET /v1/fine_tuning/jobs/{id}/events.",
            param="stream",
            code="unsupported_parameter",
        )
    fine_tune = await legacy_retrieve(db, fine_tune_id)
    return FineTuneEventList(fine_tune.events)


route_handlers = [create_job, list_jobs, retrieve_job, cancel_job, list_events, list_checkpoints]


def handlers(settings: Settings) -> list[ControllerRouterHandler]:
    """Every route of this module; the legacy ones are also mounted without /v1 (old clients),
    behind the same API key (the app's guard covers /fine-tunes too)."""
    options: dict[str, Any] = {"tags": ["fine-tunes (legacy)"]}
    legacy = [
        post(_paths(), status_code=200, responses=api_errors(*JSON_BODY, 404), **options)(
            legacy_create
        ),
        get(_paths(), responses=api_errors(), **options)(legacy_list),
        get(_paths("/{fine_tune_id:str}"), responses=api_errors(404), **options)(legacy_retrieve),
        post(
            _paths("/{fine_tune_id:str}/cancel"),
            status_code=200,
            responses=api_errors(404, 409),
            **options,
        )(legacy_cancel),
        get(_paths("/{fine_tune_id:str}/events"), responses=api_errors(400, 404), **options)(
            legacy_events
        ),
    ]
    return [*route_handlers, *legacy]
