"""The server keeps the contract its /openapi.json states: a property-based run (schemathesis)
against the real server with the tiny model, plus the body limits and media types by hand.

Schemathesis generates requests from the schema, valid and invalid, and checks every answer: no
5xx, a documented status, a documented content type, a body matching the documented schema.
Model, adapter, file and job ids in the generated requests are replaced by ones that exist, so
requests get past "no such model" into the code behind it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from mlx_core.lora.formats import save_adapter
from server.app import create_app
from server.settings import Settings, SettingsError
from tests.engine.test_lora import random_adapter
from tests.server.test_server_basics import assert_openai_error
from tests.serving import start_model_server

pytestmark = pytest.mark.timeout(600)

TRAINING_LINE = b'{"prompt": "table: t\\nQ: x\\nA:", "completion": " SELECT a FROM t"}\n'


class Known:
    """Ids that exist on the server under test, by the parameter or field names that hold them."""

    def __init__(self, url: str, model: str, adapter: str, file_id: str, job_id: str) -> None:
        self.url = url
        self.values = {
            "model": model,
            "model_id": adapter,
            "name": adapter,
            "lora_name": adapter,
            "file_id": file_id,
            "training_file": file_id,
            "fine_tuning_job_id": job_id,
            "fine_tune_id": job_id,
        }


@pytest.fixture(scope="module")
def known(tiny_hf_model, tiny_model, tmp_path_factory) -> Iterator[Known]:
    data = tmp_path_factory.mktemp("contract-data")
    save_adapter(
        data / "incoming" / "qv", random_adapter(tiny_model.args, ("q_proj",), (0,), rank=4)
    )
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=data,
        served_model_name="tiny",
        start_worker=False,  # jobs stay queued: the run checks the API, not training
        max_body_mb=1,
        max_upload_mb=1,
    )
    with start_model_server(settings) as (url, _engine):
        r = httpx.post(f"{url}/v1/adapters", json={"name": "qv", "path": "incoming/qv"})
        assert r.status_code == 201, r.text
        files = {"file": ("train.jsonl", TRAINING_LINE * 20)}
        r = httpx.post(f"{url}/v1/files", data={"purpose": "fine-tune"}, files=files)
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        r = httpx.post(
            f"{url}/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
        )
        assert r.status_code == 200, r.text
        yield Known(url, "tiny", "qv", file_id, r.json()["id"])


def app_schema() -> dict[str, Any]:
    """The OpenAPI document of a default app, as GET /openapi.json serves it (the routes do not
    depend on the model)."""
    with tempfile.TemporaryDirectory(prefix="loraforge-schema-") as data_dir:
        app = create_app(Settings(data_dir=Path(data_dir)))
        return json.loads(json.dumps(app.openapi_schema.to_schema(), default=str))


# Loaded at collection (schemathesis makes one test per operation from it), not from the running
# server: schemathesis's fixture-based loader needs pytest < 9 (it sets Node._nodeid).
SPEC = app_schema()
schema = schemathesis.openapi.from_dict(SPEC)


def supply_known_ids(case: Any, known: Known) -> None:
    """Use ids that exist where the generated request names a model, adapter, file or job."""
    for name in list(case.path_parameters or {}):
        if name in known.values:
            case.path_parameters[name] = known.values[name]
    if isinstance(case.body, dict):
        for name in list(case.body):
            if name in known.values and isinstance(case.body[name], str):
                case.body[name] = known.values[name]


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,  # a completion may wait for a batch slot: time is not the contract
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same requests every run: a failure here is reproducible
    database=None,  # nothing written into the checkout
)
def test_server_keeps_its_openapi_contract(case: Any, known: Known) -> None:
    supply_known_ids(case, known)
    # positive_data_acceptance expects every schema-valid request to succeed, but the schema
    # describes shapes, not the values the server checks against its own state: an adapter `path`
    # must be an adapter folder, an upload a .tar.gz of one, `after` an id from the list, and
    # fields OpenAI defines that loraforge cannot honour (`suffix`, `integrations`) are declared
    # only to refuse them by name. Those 400s are right; every other check runs.
    case.call_and_validate(
        base_url=known.url,
        timeout=60,
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )


def test_the_schema_tested_is_the_one_served(known: Known) -> None:
    assert httpx.get(f"{known.url}/openapi.json").json() == SPEC


# -- body limits and media types, by hand -------------------------------------------------------


def test_json_body_over_max_body_mb_is_413_before_it_is_read(known: Known) -> None:
    body = b'{"model": "tiny", "prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    r = httpx.post(
        f"{known.url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    error = assert_openai_error(r, 413)
    assert error["code"] == "request_too_large" and "--max-body-mb" in error["message"]


def test_upload_is_limited_by_max_upload_mb_not_max_body_mb(known: Known, tmp_path: Path) -> None:
    under = TRAINING_LINE * (900 * 1024 // len(TRAINING_LINE))  # ~0.9 MB: fits 1 MB
    r = httpx.post(
        f"{known.url}/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("under.jsonl", under)},
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{known.url}/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("over.jsonl", under * 2)},
    )
    error = assert_openai_error(r, 413, param="file")
    assert "--max-upload-mb" in error["message"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_json_route_refuses_other_media_types_with_415(known: Known, content_type: str) -> None:
    r = httpx.post(
        f"{known.url}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}',
        headers={"content-type": content_type},
    )
    error = assert_openai_error(r, 415)
    assert error["code"] == "unsupported_media_type"
    assert "-H 'Content-Type: application/json'" in error["message"]


@pytest.mark.parametrize(
    "content_type", [None, "application/json; charset=utf-8", "application/merge-patch+json"]
)
def test_json_route_takes_json_media_types_and_none(known: Known, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(
        f"{known.url}/v1/completions",
        content=b'{"model": "tiny", "prompt": "Hello", "max_tokens": 2}',
        headers=headers,
    )
    assert r.status_code == 200, r.text


def test_upload_route_refuses_json_with_415_naming_multipart(known: Known) -> None:
    r = httpx.post(f"{known.url}/v1/files", json={"purpose": "fine-tune"})
    error = assert_openai_error(r, 415)
    assert "multipart/form-data" in error["message"]


def test_adapters_route_takes_json_and_multipart_but_not_text(known: Known) -> None:
    r = httpx.post(
        f"{known.url}/v1/adapters",
        content=b"name=x",
        headers={"content-type": "text/plain"},
    )
    error = assert_openai_error(r, 415)
    assert "application/json" in error["message"] and "multipart/form-data" in error["message"]
    # multipart gets past the media type check to the form's own checks
    r = httpx.post(f"{known.url}/v1/adapters", data={"name": "x"}, files={"other": ("a", b"")})
    assert assert_openai_error(r, 400, param="other")


def test_options_allow_names_every_method_of_the_path(known: Known) -> None:
    for path, methods in [
        ("/v1/adapters", "GET, OPTIONS, POST"),
        ("/v1/files", "GET, OPTIONS, POST"),
        ("/v1/files/file-x", "DELETE, GET, OPTIONS"),
        ("/v1/completions", "OPTIONS, POST"),
    ]:
        r = httpx.options(f"{known.url}{path}")
        assert r.status_code == 204 and r.headers["allow"] == methods, path


def test_schema_documents_openai_errors_and_both_completion_answers(known: Known) -> None:
    spec = httpx.get(f"{known.url}/openapi.json").json()
    completions = spec["paths"]["/v1/completions"]["post"]["responses"]
    ok = completions["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionResponse"}
    assert "text/event-stream" in ok
    for status in ("400", "401", "404", "413", "415", "429", "500", "503"):
        schema_ref = completions[status]["content"]["application/json"]["schema"]
        assert schema_ref == {"$ref": "#/components/schemas/ErrorBody"}, status
    # no route documents Litestar's own error shape
    assert "status_code" not in str(spec["paths"])


def test_stream_is_sent_as_server_sent_events(known: Known) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "stream": True}
    r = httpx.post(f"{known.url}/v1/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("field", "value"), [("ignore_eos", 0), ("n", "2"), ("max_tokens", 1.5), ("echo", "true")]
)
def test_json_bodies_are_decoded_strictly(known: Known, field: str, value: object) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, field: value}
    error = assert_openai_error(httpx.post(f"{known.url}/v1/completions", json=body), 400, field)
    assert "Expected" in error["message"]


def test_an_integral_float_is_an_integer_as_json_schema_says(known: Known) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2.0, "n": 1.0}
    assert httpx.post(f"{known.url}/v1/completions", json=body).status_code == 200


def test_max_body_mb_is_a_setting_with_an_env_twin() -> None:
    assert Settings().max_body_bytes == 16 * 1024 * 1024
    assert Settings.from_env({"LORAFORGE_MAX_BODY_MB": "2.5"}).max_body_bytes == int(2.5 * 2**20)
    with pytest.raises(SettingsError, match="--max-body-mb"):
        Settings(max_body_mb=0)
