"""The Files API through the `openai` SDK (and httpx where the SDK cannot say it), real server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from server.db import Database, FineTuningJob
from server.settings import Settings
from tests.serving import start_server

WIKISQL = Path("/work/shared/data/wikisql/train.jsonl")
if not WIKISQL.exists():  # CI has shared/ beside the clone instead
    WIKISQL = Path(__file__).resolve().parents[3] / "shared/data/wikisql/train.jsonl"


@pytest.fixture
def wikisql_slice(tmp_path) -> Path:
    lines = WIKISQL.read_text(encoding="utf-8").splitlines(keepends=True)[:40]
    path = tmp_path / "wikisql-train.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture
def settings(tmp_path) -> Settings:
    # 20 KB: the 40-line slice (~9 KB) fits, the full 1000-line file does not.
    return Settings(data_dir=tmp_path / "data", max_upload_mb=0.02)


@pytest.fixture
def server(settings):
    with start_server(settings) as base_url:
        yield base_url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def stored_files(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.files_dir.iterdir())


def test_upload_list_retrieve_download_delete(client, settings, wikisql_slice):
    with wikisql_slice.open("rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.id.startswith("file-")
    assert uploaded.object == "file"
    assert uploaded.bytes == wikisql_slice.stat().st_size
    assert uploaded.filename == "wikisql-train.jsonl"
    assert uploaded.purpose == "fine-tune"
    assert uploaded.status == "processed"
    assert stored_files(settings) == [f"{uploaded.id}.jsonl"]

    with wikisql_slice.open("rb") as f:
        second = client.files.create(file=("second.jsonl", f.read()), purpose="fine-tune")

    listed = client.files.list()
    assert [f.id for f in listed.data] == [second.id, uploaded.id]  # newest first
    assert [f.id for f in client.files.list(purpose="fine-tune", order="asc").data] == [
        uploaded.id,
        second.id,
    ]
    assert client.files.list(purpose="batch").data == []

    retrieved = client.files.retrieve(uploaded.id)
    assert retrieved.model_dump() == uploaded.model_dump()
    assert client.files.content(uploaded.id).read() == wikisql_slice.read_bytes()

    deleted = client.files.delete(uploaded.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (uploaded.id, "file", True)
    assert stored_files(settings) == [f"{second.id}.jsonl"]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_list_pages_with_limit_and_after(server, client, wikisql_slice):
    ids = [client.files.create(file=wikisql_slice, purpose="fine-tune").id for _ in range(3)]
    page = httpx.get(f"{server}/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True and page["last_id"] == ids[1]
    rest = httpx.get(f"{server}/v1/files", params={"limit": 2, "after": page["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False


def test_curl_style_upload_works(server, wikisql_slice):
    # What `curl -F purpose=fine-tune -F file=@train.jsonl` sends.
    r = httpx.post(
        f"{server}/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("train.jsonl", wikisql_slice.read_bytes(), "application/jsonl")},
    )
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "train.jsonl"


def test_malformed_file_is_refused_by_line_and_nothing_is_kept(client, settings, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "SELECT 1"}\n'
        "this is not json\n"
        '{"text": "SELECT 2"}\n'
        '{"prompt": "Q", "completion": "A"}\n',
        encoding="utf-8",
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=bad, purpose="fine-tune")
    error = caught.value.body
    assert caught.value.status_code == 400
    assert error["param"] == "file"
    assert error["code"] == "invalid_file_format"
    assert "line 2" in error["message"] and "line 4" in error["message"]
    assert "line 1:" not in error["message"] and "line 3" not in error["message"]
    assert stored_files(settings) == []
    assert client.files.list().data == []


def test_wrong_purpose_is_400_and_nothing_is_kept(client, settings, wikisql_slice):
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=wikisql_slice, purpose="assistants")
    assert caught.value.body["param"] == "purpose"
    assert "fine-tune" in caught.value.body["message"]
    assert stored_files(settings) == []


def test_unsupported_form_field_is_400(client, wikisql_slice):
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(
            file=wikisql_slice,
            purpose="fine-tune",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
    assert "expires_after is not supported" in caught.value.body["message"]


def test_oversize_upload_is_413_whether_announced_or_streamed(server, client, settings):
    too_big = WIKISQL.read_bytes()  # ~200 KB against a 20 KB limit
    assert len(too_big) > settings.max_upload_bytes

    # The SDK sends Content-Length: refused before the body is read.
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("big.jsonl", too_big), purpose="fine-tune")
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "file_too_large"
    assert "--max-upload-mb" in caught.value.body["message"]

    # A chunked body has no length to check up front: it is counted as it streams in.
    boundary = "loraforgetestboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        yield head
        for i in range(0, len(too_big), 8192):
            yield too_big[i : i + 8192]
        yield tail

    r = httpx.post(
        f"{server}/v1/files",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "file_too_large"
    assert stored_files(settings) == []


def test_unknown_file_id_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve("file-doesnotexist")
    assert "file-doesnotexist" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.files.delete("file-doesnotexist")
    r = httpx.get(f"{server}/v1/files/file-doesnotexist/content")
    assert r.status_code == 404
    assert json.loads(r.text)["error"]["param"] == "file_id"


def test_file_used_by_an_unfinished_job_cannot_be_deleted(client, settings, wikisql_slice):
    file_id = client.files.create(file=wikisql_slice, purpose="fine-tune").id
    db = Database.open(settings.database_url)
    job = FineTuningJob(
        model="loraforge-demo", training_file=file_id, hyperparameters={}, lora={}, seed=0
    )
    db.run_sync(lambda session: session.add(job))

    with pytest.raises(openai.ConflictError) as caught:
        client.files.delete(file_id)
    assert job.id in caught.value.body["message"]
    assert caught.value.response.headers["x-should-retry"] == "false"

    db.run_sync(lambda session: setattr(session.get(FineTuningJob, job.id), "status", "failed"))
    db.close()
    assert client.files.delete(file_id).deleted is True
