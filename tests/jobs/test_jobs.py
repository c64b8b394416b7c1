"""Fine-tuning jobs as a user runs them: the `openai` SDK (and httpx for the legacy API) against the
real server with its job worker, real SQLite, real training subprocesses on the tiny model."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select

from server.db import Database, FineTuningJob, UploadedFile
from server.jobs.spec import auto_lr_multiplier
from server.jobs.worker import MEMORY_LIMIT_ENV
from server.settings import Settings
from tests.models import TINY
from tests.serving import start_model_server, start_server

pytestmark = pytest.mark.timeout(300)

WIKISQL = Path("/work/shared/data/wikisql")
if not WIKISQL.is_dir():  # CI has shared/ beside the clone instead
    WIKISQL = Path(__file__).resolve().parents[3] / "shared/data/wikisql"
PROMPT = "table: 1-10015132-11\ncolumns: Player, No., Nationality, Position\nQ: Who is No. 5?\nA:"


def wikisql_file(tmp_path: Path, split: str, n: int) -> Path:
    lines = (WIKISQL / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / f"{split}-{n}.jsonl"
    path.write_text("".join(lines[:n]), encoding="utf-8")
    return path


def wait_for_job(
    client: openai.OpenAI,
    job_id: str,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    timeout_s: float = 120.0,
):
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job.status} after {timeout_s} s"
        time.sleep(0.25)


def messages(client: openai.OpenAI, job_id: str) -> list[str]:
    """The job's event messages, oldest first (the SDK pages through them newest first)."""
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)][::-1]


def process_running(pid: int) -> bool:
    """Alive and not a zombie (a dead child nobody reaped yet is not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def settings(tiny_hf_model, tmp_path_factory) -> Settings:
    return Settings(
        model=str(tiny_hf_model), served_model_name="tiny", data_dir=tmp_path_factory.mktemp("data")
    )


@pytest.fixture(scope="module")
def server(settings):
    with start_model_server(settings) as (url, _engine):
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def db(settings):
    database = Database.open(settings.database_url)
    yield database
    database.close()


@pytest.fixture(scope="module")
def train_file(client, tmp_path_factory) -> str:
    path = wikisql_file(tmp_path_factory.mktemp("wikisql"), "train", 8)
    return client.files.create(file=path, purpose="fine-tune").id


@pytest.mark.slow
def test_fine_tune_then_serve_download_and_delete(server, client, settings, train_file, tmp_path):
    valid = client.files.create(file=wikisql_file(tmp_path, "valid", 4), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train_file,
        validation_file=valid,
        suffix="sql",
        seed=7,
        hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 20},
        extra_body={"lora": {"rank": 4, "alpha": 8}},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert (job.status, job.model, job.seed, job.fine_tuned_model) == ("queued", "tiny", 7, None)
    assert job.hyperparameters.to_dict() == {
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 20.0,
    }
    assert job.to_dict()["lora"]["rank"] == 4

    done = wait_for_job(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:sql:{job.id}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at and done.error is None

    # Events: newest first, pageable, with the numbers in `data`.
    log = messages(client, job.id)
    assert log[0] == f"Validating training file: {train_file}"
    assert "Fine-tuning job started" in log
    assert [m.split(":")[0] for m in log if ": training loss=" in m] == [
        f"Step {i}/4" for i in (1, 2, 3, 4)
    ]
    assert any(m.startswith("Step 4/4: validation loss=") for m in log)
    assert log[-2:] == [
        f"New fine-tuned model created: {done.fine_tuned_model}",
        "The job has successfully completed",
    ]
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    older = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert page.has_more and [e.message for e in page.data + older.data] == log[::-1][:6]
    metrics = [e.data for e in page.data + older.data if e.type == "metrics"]
    assert metrics and all(d["total_steps"] == 4 for d in metrics)

    # Checkpoints (one per step for a 4-step job), newest first, with losses.
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 3, 2, 1]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"
    assert checkpoints[0].metrics.train_loss > 0 and checkpoints[0].metrics.valid_loss > 0

    # The adapter, downloadable as the job's result file.
    [result_id] = done.result_files
    assert client.files.retrieve(result_id).purpose == "fine-tune-results"
    with tarfile.open(fileobj=io.BytesIO(client.files.content(result_id).read())) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapters.safetensors"]

    # Served at once, by name.
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    r = client.completions.create(
        model=done.fine_tuned_model, prompt=PROMPT, max_tokens=8, temperature=0
    )
    assert r.model == done.fine_tuned_model and r.usage.completion_tokens >= 1

    # The same job through the legacy API, by either id, with or without /v1.
    legacy_id = "ft-" + job.id.removeprefix("ftjob-")
    legacy = httpx.get(f"{server}/v1/fine-tunes/{legacy_id}").json()
    assert legacy["id"] == legacy_id and legacy["object"] == "fine-tune"
    assert (legacy["status"], legacy["fine_tuned_model"]) == ("succeeded", done.fine_tuned_model)
    assert legacy["training_files"][0]["id"] == train_file
    assert legacy["validation_files"][0]["id"] == valid
    assert legacy["result_files"][0]["id"] == result_id
    assert legacy["hyperparams"]["n_epochs"] == 1 and legacy["hyperparams"]["batch_size"] == 2
    assert legacy["events"][-1]["message"] == "The job has successfully completed"
    assert httpx.get(f"{server}/v1/fine-tunes/{job.id}").json()["id"] == legacy_id
    assert legacy_id in [f["id"] for f in httpx.get(f"{server}/fine-tunes").json()["data"]]
    assert client.fine_tuning.jobs.retrieve(legacy_id).id == job.id

    # A finished job cannot be cancelled.
    with pytest.raises(openai.ConflictError) as caught:
        client.fine_tuning.jobs.cancel(job.id)
    assert "already succeeded" in caught.value.body["message"]

    # Deleting the model removes it from serving; the job keeps its record.
    deleted = client.models.delete(done.fine_tuned_model)
    assert deleted.deleted and deleted.id == done.fine_tuned_model
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=done.fine_tuned_model, prompt=PROMPT, max_tokens=2)
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == done.fine_tuned_model


@pytest.mark.slow
def test_legacy_fine_tune_is_the_same_job_in_both_apis(server, client, train_file):
    r = httpx.post(
        f"{server}/v1/fine-tunes",
        json={"training_file": train_file, "n_epochs": 2, "suffix": "legacy"},
    )
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["id"].startswith("ft-") and created["status"] == "pending"
    # Legacy defaults: no batch size -> "auto" (8 examples -> 1); prompt/completion-less text
    # examples have no prompt to weigh, so the prompt's weight stays 1.
    assert created["hyperparams"] == {
        "n_epochs": 2,
        "batch_size": 1,
        "learning_rate_multiplier": auto_lr_multiplier(TINY["hidden_size"]),  # "auto"
        "prompt_loss_weight": 1.0,
    }
    job_id = "ftjob-" + created["id"].removeprefix("ft-")
    assert job_id in [j.id for j in client.fine_tuning.jobs.list()]

    cancelled = httpx.post(f"{server}/fine-tunes/{created['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    events = httpx.get(f"{server}/v1/fine-tunes/{created['id']}/events").json()["data"]
    assert events[0]["message"] == f"Validating training file: {train_file}"
    assert "Job cancelled" in [e["message"] for e in events]
    assert httpx.post(f"{server}/v1/fine-tunes/{created['id']}/cancel").status_code == 409


@pytest.mark.slow
def test_cancel_stops_the_trainer_within_seconds(client, db, train_file):
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=train_file, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    deadline = time.monotonic() + 60
    while not any(m.startswith("Step 1/400: training loss") for m in messages(client, job.id)):
        assert time.monotonic() < deadline, "the trainer did not report its first step in 60 s"
        time.sleep(0.25)
    pid = db.run_sync(lambda s: s.get(FineTuningJob, job.id).pid)
    assert pid and process_running(pid)

    started = time.monotonic()
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    while process_running(pid):
        assert time.monotonic() - started < 10, "the trainer outlived its cancelled job"
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while "Trainer stopped" not in messages(client, job.id):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is None


BAD_REQUESTS = [
    # (what the request changes, error class, param)
    (dict(training_file="file-doesnotexist"), openai.BadRequestError, "training_file"),
    (dict(validation_file="file-doesnotexist"), openai.BadRequestError, "validation_file"),
    (dict(training_file="WRONG_PURPOSE"), openai.BadRequestError, "training_file"),
    (dict(model="gpt-4o-mini"), openai.NotFoundError, "model"),
    (dict(hyperparameters={"n_epochs": 0}), openai.BadRequestError, "hyperparameters.n_epochs"),
    (dict(hyperparameters={"n_epochs": 51}), openai.BadRequestError, "hyperparameters.n_epochs"),
    (
        dict(hyperparameters={"n_epochs": "many"}),
        openai.BadRequestError,
        "hyperparameters.n_epochs",
    ),
    (dict(hyperparameters={"n_epochs": 1.5}), openai.BadRequestError, "hyperparameters.n_epochs"),
    (dict(hyperparameters={"batch_size": 0}), openai.BadRequestError, "hyperparameters.batch_size"),
    (
        dict(hyperparameters={"batch_size": 16}),
        openai.BadRequestError,
        "hyperparameters.batch_size",
    ),
    (
        dict(hyperparameters={"learning_rate_multiplier": 0}),
        openai.BadRequestError,
        "hyperparameters.learning_rate_multiplier",
    ),
    (
        dict(method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": -1}}}),
        openai.BadRequestError,
        "hyperparameters.n_epochs",
    ),
    (dict(method={"type": "dpo", "dpo": {}}), openai.BadRequestError, "method.type"),
    (dict(suffix="x" * 65), openai.BadRequestError, "suffix"),
    (dict(suffix="a:b"), openai.BadRequestError, "suffix"),
    (dict(seed=-1), openai.BadRequestError, "seed"),
    (
        dict(integrations=[{"type": "wandb", "wandb": {"project": "p"}}]),
        openai.BadRequestError,
        "integrations",
    ),
    (dict(extra_body={"lora": {"rank": 1000}}), openai.BadRequestError, "lora.rank"),
    (dict(extra_body={"lora": {"targets": ["qkv"]}}), openai.BadRequestError, "lora.targets"),
    (
        dict(extra_body={"lora": {"mask_prompt": True}}),
        openai.BadRequestError,
        "lora.completion_after",
    ),
    (dict(extra_body={"lora": {"ranks": 4}}), openai.BadRequestError, "lora.ranks"),
]


@pytest.mark.parametrize(
    ("change", "error", "param"), BAD_REQUESTS, ids=[str(c)[:60] for c, _, _ in BAD_REQUESTS]
)
def test_bad_requests_are_openai_errors_and_create_nothing(
    client, db, train_file, change, error, param
):
    if change.get("training_file") == "WRONG_PURPOSE":  # a file only the server itself makes
        row = UploadedFile(filename="x.tar.gz", purpose="fine-tune-results", bytes=1, path="/x")
        db.run_sync(lambda s: s.add(row))
        change = {"training_file": row.id}
    counts = (
        select(func.count()).select_from(FineTuningJob),
        select(func.count()).select_from(UploadedFile),
    )
    before = db.run_sync(lambda s: [s.scalar(c) for c in counts])
    request = {"model": "tiny", "training_file": train_file, **change}
    with pytest.raises(error) as caught:
        client.fine_tuning.jobs.create(**request)
    body = caught.value.body
    assert caught.value.status_code in (400, 404)
    assert body["param"] == param, body
    assert len(body["message"]) > 40, body["message"]  # says what is wrong and what to do
    assert db.run_sync(lambda s: [s.scalar(c) for c in counts]) == before


def test_job_that_cannot_fit_fails_fast_with_the_estimate(
    client, settings, train_file, monkeypatch
):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "0.001")  # the worker reads it when it starts a job
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=train_file, hyperparameters={"n_epochs": 1, "batch_size": 2}
    )
    failed = wait_for_job(client, job.id, timeout_s=60)
    assert failed.status == "failed" and failed.fine_tuned_model is None
    assert time.monotonic() - started < 30
    assert failed.error.code == "insufficient_memory"
    assert "batch 2 with 2 LoRA layers needs ~" in failed.error.message
    assert (
        "GB free" in failed.error.message and "hyperparameters.batch_size" in failed.error.message
    )
    assert messages(client, job.id)[-1] == failed.error.message
    # Refused before a byte of the model was loaded.
    log = (settings.jobs_dir / job.id / "train.log").read_text()
    assert "Memory estimate" not in log and "Loading pretrained model" not in log
    assert not any(m.id.endswith(job.id) for m in client.models.list())


def test_legacy_paths_without_v1_need_the_api_key_too(tmp_path):
    with start_server(Settings(data_dir=tmp_path, api_key="sekret")) as url:
        assert httpx.get(f"{url}/fine-tunes").status_code == 401
        assert httpx.get(f"{url}/v1/fine-tunes").status_code == 401
        denied = httpx.get(f"{url}/fine-tunes", headers={"Authorization": "Bearer wrong"})
        assert (
            denied.status_code == 401 and "Incorrect API key" in denied.json()["error"]["message"]
        )
        ok = httpx.get(f"{url}/fine-tunes", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200 and ok.json() == {"data": [], "object": "list"}


def test_auto_hyperparameters_follow_the_model_and_the_data(client, train_file, tmp_path):
    # The learning rate from the model's width: 2e-4 at Mistral-7B's 4096, more for narrower
    # models (the embedded model's 256: 8e-4), capped at 1e-3 (the tiny test model's 64).
    assert auto_lr_multiplier(4096) == 20.0 and auto_lr_multiplier(256) == 80.0
    assert auto_lr_multiplier(64) == 100.0 and auto_lr_multiplier(16384) == 10.0
    text_job = client.fine_tuning.jobs.create(model="tiny", training_file=train_file)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"Q: {i} + {i}?\nA:", "completion": f" {2 * i}"}) + "\n"
            for i in range(8)
        )
    )
    pairs_file = client.files.create(file=pairs, purpose="fine-tune").id
    pairs_job = client.fine_tuning.jobs.create(model="tiny", training_file=pairs_file)
    for job in (text_job, pairs_job):
        client.fine_tuning.jobs.cancel(job.id)
    assert text_job.hyperparameters.learning_rate_multiplier == 100.0
    # Prompt/completion data learns its completions; plain text (no marker given) learns it all.
    lora = {j.id: (j.model_extra or {}).get("lora") or {} for j in (text_job, pairs_job)}
    assert lora[pairs_job.id]["mask_prompt"] is True
    assert lora[text_job.id]["mask_prompt"] is False
