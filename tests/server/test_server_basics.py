"""The server without a model: health, readiness, metrics, API description, errors and auth.

Every check starts the real app under uvicorn and talks to it over HTTP, as a user would.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import httpx
import openai
import pytest
from litestar import Litestar, get, post
from litestar.params import JSONBody

from mlx_core.config import ModelArgs
from server.engine_client import EngineClient, ModelInfo
from server.errors import APIError, RateLimitError, decode_body, exception_handlers
from server.schemas.completions import CompletionRequest
from server.settings import Settings, SettingsError
from tests.serving import serve, start_server

API_KEY = "sk-test-123"


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    assert error["param"] == param
    assert "Traceback" not in error["message"]
    return error


@pytest.fixture
def base_url(tmp_path):
    with start_server(Settings(data_dir=tmp_path / "data")) as url:
        yield url


@pytest.fixture
def keyed_url(tmp_path):
    with start_server(Settings(data_dir=tmp_path / "data", api_key=API_KEY)) as url:
        yield url


def test_health_is_ok(base_url):
    r = httpx.get(f"{base_url}/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_ready_is_503_without_an_engine(base_url):
    error = assert_openai_error(httpx.get(f"{base_url}/ready"), 503)
    assert error["type"] == "server_error"
    assert "loraforge serve" in error["message"]


class FakeLoadingEngine:
    """Stands in for the engine client only to exercise /ready's two states."""

    require_ready = EngineClient.require_ready  # the real readiness rule, on this fake's state

    def __init__(self) -> None:
        self.ready = self.draining = False
        self.model: ModelInfo | None = None
        self.load_error = None
        self.blas = None  # not measured: /ready then says only "ready"
        self.started = self.stopped = False

    def finish_loading(self) -> None:
        args = ModelArgs(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=8, vocab_size=8)
        self.model = ModelInfo("fake", args, max_model_len=8)
        self.ready = True

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True


def test_ready_follows_the_engine_and_lifespan_starts_and_stops_it(tmp_path):
    engine = FakeLoadingEngine()
    with start_server(Settings(data_dir=tmp_path), engine) as url:
        assert engine.started
        r = httpx.get(f"{url}/ready")
        assert_openai_error(r, 503)
        assert r.headers["retry-after"] == "5"
        engine.finish_loading()
        assert httpx.get(f"{url}/ready").json() == {
            "status": "ready",
            "database": {"dialect": "sqlite", "reachable": True},
            "storage": {"writable": True},
        }
    assert engine.stopped


def test_ready_says_when_the_shared_data_dir_takes_no_writes(tmp_path):
    engine = FakeLoadingEngine()
    engine.finish_loading()
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'db'}")
    with start_server(settings, engine) as url:
        assert httpx.get(f"{url}/ready").status_code == 200
        # The shared folder unmounted under the replica: stand in for it with a file.
        (tmp_path / "data").rename(tmp_path / "gone")
        (tmp_path / "data").write_text("not a folder")
        error = assert_openai_error(httpx.get(f"{url}/ready"), 503)
        assert error["code"] == "data_dir_not_writable"
        assert "--data-dir" in error["message"]
        (tmp_path / "data").unlink()
        (tmp_path / "gone").rename(tmp_path / "data")
        assert httpx.get(f"{url}/ready").status_code == 200


def test_startup_creates_data_dirs_and_database(tmp_path):
    data = tmp_path / "fresh" / "data"
    with start_server(Settings(data_dir=data)):
        assert {p.name for p in data.iterdir()} >= {"files", "adapters", "jobs", "loraforge.db"}


def test_metrics_count_requests_by_route_and_status(base_url):
    httpx.get(f"{base_url}/health")
    httpx.get(f"{base_url}/v1/files/file-nope")
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert "# TYPE loraforge_http_requests_total counter" in text
    assert 'loraforge_http_requests_total{method="GET",route="/health",status="200"} 1' in text
    assert (
        'loraforge_http_requests_total{method="GET",route="/v1/files/{file_id}",'
        'status="404"} 1' in text
    )
    for name in (
        "loraforge_prompt_tokens_total",
        "loraforge_generation_tokens_total",
        "loraforge_num_requests_running",
        "loraforge_num_requests_waiting",
        "loraforge_time_to_first_token_seconds",
    ):
        assert f"# TYPE {name} " in text
    assert "loraforge_num_requests_running 0" in text


@pytest.mark.slow
def test_made_up_methods_do_not_grow_the_metrics(base_url):
    before = len(httpx.get(f"{base_url}/metrics").text)
    codes = {httpx.request(f"M{i}X", f"{base_url}/v1/models").status_code for i in range(300)}
    # uvicorn's httptools parser refuses methods it does not know (400) before the app sees
    # them; where one gets through, the app counts it under method="other"
    assert codes <= {400, 405}
    for method in ("PROPFIND", "MKCOL", "LOCK"):  # known to the parser, not to the API
        assert_openai_error(httpx.request(method, f"{base_url}/v1/models"), 405)
    text = httpx.get(f"{base_url}/metrics").text
    assert "M7X" not in text and "PROPFIND" not in text and 'method="other"' in text
    assert len(text) < before + 4000  # one new label set for "other", not one per method


def test_json_nested_thousands_deep_is_400(base_url):
    body = b"[" * 10_000 + b"]" * 10_000
    r = httpx.post(
        f"{base_url}/v1/completions", content=body, headers={"content-type": "application/json"}
    )
    error = assert_openai_error(r, 400)
    assert "nested too deeply" in error["message"]


def test_openapi_schema_describes_the_api(base_url):
    r = httpx.get(f"{base_url}/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    assert schema["info"]["title"] == "loraforge"
    assert "/v1/files" in schema["paths"]
    assert "FileObject" in schema["components"]["schemas"]


def test_docs_page_loads_everything_from_the_server_itself(keyed_url):
    # Offline use: no script, style or icon from a CDN; the page and its assets need no key.
    page = httpx.get(f"{keyed_url}/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    urls = re.findall(r"(?:src|href)=['\"]([^'\"]+)['\"]", page.text)
    assert urls and not [u for u in urls if "://" in u or u.startswith("//")], urls
    for url in urls:
        asset = httpx.get(f"{keyed_url}{url}")
        assert asset.status_code == 200, url
        assert len(asset.content) > 500, url


def test_unknown_route_is_404_in_openai_shape(base_url):
    error = assert_openai_error(httpx.get(f"{base_url}/v1/nothing-here"), 404)
    assert error["type"] == "invalid_request_error"
    assert "GET /v1/nothing-here" in error["message"]
    for path in ("/foo", "/foo/bar", "/openapi.txt"):  # outside /v1 too: JSON, never HTML
        error = assert_openai_error(httpx.get(f"{base_url}{path}"), 404)
        assert f"GET {path}" in error["message"]


def test_wrong_method_is_405_in_openai_shape(base_url):
    error = assert_openai_error(httpx.put(f"{base_url}/v1/files"), 405)
    assert "PUT /v1/files" in error["message"]


def test_upload_that_is_not_multipart_is_415(base_url):
    r = httpx.post(
        f"{base_url}/v1/files",
        content=b'{"purpose": ',
        headers={"content-type": "application/json"},
    )
    error = assert_openai_error(r, 415)
    assert error["code"] == "unsupported_media_type"
    assert "multipart/form-data" in error["message"]


# -- how JSON request bodies fail -----------------------------------------------------------------
# The JSON routes (completions, chat, jobs) live in other modules; this app has one route taking
# the real CompletionRequest with the real exception handlers, so the translation of msgspec and
# Litestar errors is checked on its own, over HTTP.


@post("/v1/echo", sync_to_thread=False)
def echo(data: JSONBody[CompletionRequest]) -> CompletionRequest:
    return data


@get("/v1/busy", sync_to_thread=False)
def busy() -> None:
    raise RateLimitError("The server is busy: 256 requests queued. Retry shortly.", retry_after_s=3)


@pytest.fixture(scope="module")
def echo_url():
    app = Litestar([echo, busy], exception_handlers=exception_handlers(), logging_config=None)
    with serve(app) as url:
        yield f"{url}/v1/echo"


def test_valid_body_decodes(echo_url):
    r = httpx.post(echo_url, json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 4})
    assert r.status_code == 201, r.text
    assert r.json()["prompt"] == [1, 2, 3]


def test_broken_json_is_400(echo_url):
    headers = {"content-type": "application/json"}
    r = httpx.post(echo_url, content=b'{"model": "m", ', headers=headers)
    error = assert_openai_error(r, 400)
    assert error["code"] == "invalid_json"
    assert "valid JSON" in error["message"]


def test_empty_body_is_400(echo_url):
    error = assert_openai_error(httpx.post(echo_url), 400)
    assert "empty" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "m", "prompt": "p", "max_tokens": "ten"}, "max_tokens", "got `str`"),
        ({"model": "m", "prompt": "p", "temperature": None}, "temperature", "got `null`"),
        ({"model": "m", "prompt": "p", "frobnicate": 1}, "frobnicate", "Unrecognized"),
        ({"prompt": "p"}, "model", "Missing required parameter"),
        (
            {"model": "m", "prompt": "p", "stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
            "Expected `bool`",
        ),
        (
            {"model": "m", "prompt": "p", "stream_options": {"bogus": True}},
            "stream_options.bogus",
            "Unrecognized",
        ),
    ],
)
def test_invalid_fields_are_400_naming_the_field(echo_url, body, param, words):
    error = assert_openai_error(httpx.post(echo_url, json=body), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]


def test_decode_body_gives_the_same_errors_as_a_data_parameter():
    with pytest.raises(APIError) as caught:
        decode_body(b'{"model": "m", "prompt": "p", "bogus": 1}', CompletionRequest)
    assert (caught.value.status_code, caught.value.param) == (400, "bogus")
    with pytest.raises(APIError) as caught:
        decode_body(b'{"model": ', CompletionRequest)
    assert caught.value.code == "invalid_json"
    assert decode_body(b'{"model": "m", "prompt": "p"}', CompletionRequest).max_tokens == 16


def test_rate_limit_is_429_with_retry_after(echo_url):
    r = httpx.get(echo_url.replace("/v1/echo", "/v1/busy"))
    error = assert_openai_error(r, 429)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert r.headers["retry-after"] == "3"


def test_body_over_the_limit_is_413(tmp_path):
    app = Litestar(
        [echo],
        exception_handlers=exception_handlers(),
        logging_config=None,
        request_max_body_size=1000,
    )
    with serve(app) as url:
        r = httpx.post(f"{url}/v1/echo", json={"model": "m", "prompt": "x" * 5000})
    assert_openai_error(r, 413)


def test_unexpected_exception_is_500_without_internals(tmp_path, caplog):
    @get("/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    app = Litestar([boom], exception_handlers=exception_handlers(), logging_config=None)
    with serve(app) as url:
        r = httpx.get(f"{url}/boom")
    error = assert_openai_error(r, 500)
    assert error["type"] == "server_error"
    assert "secret" not in r.text
    assert "secret internal detail" in caplog.text  # but the operator's log has it


def test_query_parameter_of_wrong_type_is_400_naming_it(base_url):
    error = assert_openai_error(httpx.get(f"{base_url}/v1/files?limit=many"), 400, param="limit")
    assert "limit" in error["message"]


def test_api_key_is_required_on_v1_but_not_on_health(keyed_url):
    assert httpx.get(f"{keyed_url}/health").status_code == 200
    assert httpx.get(f"{keyed_url}/metrics").status_code == 200
    assert httpx.get(f"{keyed_url}/openapi.json").status_code == 200

    error = assert_openai_error(httpx.get(f"{keyed_url}/v1/files"), 401)
    assert error["code"] == "missing_api_key"
    wrong = httpx.get(f"{keyed_url}/v1/files", headers={"Authorization": "Bearer sk-wrong"})
    error = assert_openai_error(wrong, 401)
    assert error["code"] == "invalid_api_key"
    assert "sk-wrong" not in error["message"]

    right = httpx.get(f"{keyed_url}/v1/files", headers={"Authorization": f"Bearer {API_KEY}"})
    assert right.status_code == 200
    assert right.json()["data"] == []


def test_openai_sdk_sees_authentication_error(keyed_url):
    client = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.files.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"

    good = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=API_KEY, max_retries=0)
    assert list(good.files.list()) == []


# -- settings: flag > env var > default -----------------------------------------------------------


def test_settings_precedence_flag_then_env_then_default(tmp_path):
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    env = {"LORAFORGE_PORT": "7000", "LORAFORGE_API_KEY": "from-env", "LORAFORGE_DATA_DIR": "d"}
    flags = parser.parse_args(["--port", "9000", "--no-start-worker", "--max-upload-mb", "1.5"])
    settings = Settings.from_args(flags, env=env)
    assert settings.port == 9000  # the flag beats LORAFORGE_PORT
    assert settings.api_key == "from-env"  # no flag: the env var
    assert settings.max_num_seqs == 32  # neither: the default
    assert settings.start_worker is False and settings.max_upload_bytes == int(1.5 * 1024**2)
    assert settings.data_dir == Path("d").resolve()
    assert settings.database_url == f"sqlite:///{Path('d').resolve() / 'loraforge.db'}"
    assert "from-env" not in repr(settings)


def test_bad_env_value_says_which_variable_and_what_to_do():
    with pytest.raises(SettingsError, match="LORAFORGE_MAX_NUM_SEQS='lots' is not a whole number"):
        Settings.from_env({"LORAFORGE_MAX_NUM_SEQS": "lots"})
    with pytest.raises(SettingsError, match="--max-queue / LORAFORGE_MAX_QUEUE = 0"):
        Settings.from_env({"LORAFORGE_MAX_QUEUE": "0"})
    assert Settings.from_env({"LORAFORGE_MAX_MODEL_LEN": ""}).max_model_len is None


def test_empty_env_values_mean_the_default(monkeypatch):
    # `export LORAFORGE_API_KEY=` in a shell profile must not set an empty key or break commands.
    settings = Settings.from_env({"LORAFORGE_API_KEY": "", "LORAFORGE_HOST": ""})
    assert settings.api_key is None and settings.host == Settings().host
    from server.cli.jobs import DEFAULT_BASE_URL
    from server.cli.main import build_parser

    monkeypatch.setenv("LORAFORGE_BASE_URL", "")
    monkeypatch.setenv("LORAFORGE_API_KEY", "")
    ns = build_parser().parse_args(["jobs", "list"])
    assert ns.base_url == DEFAULT_BASE_URL and ns.api_key is None
