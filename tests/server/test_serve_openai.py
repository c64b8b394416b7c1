"""The real server on a free port, driven by the official `openai` SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.settings import Settings
from tests.serving import start_model_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tiny_hf_model, tmp_path_factory):
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=tmp_path_factory.mktemp("data"),
        served_model_name="tiny",
        start_worker=False,
    )
    with start_model_server(settings) as (url, engine):
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0)


def test_completion(client):
    r = client.completions.create(
        model="tiny", prompt="table: t\ncolumns: a, b\nQ: x\nA:", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion" and r.model == "tiny"
    assert len(r.choices) == 1 and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
    again = client.completions.create(
        model="tiny", prompt="table: t\ncolumns: a, b\nQ: x\nA:", max_tokens=8, temperature=0
    )
    assert again.choices[0].text == r.choices[0].text


def test_streaming_matches_non_streaming(client):
    plain = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="Hello",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_and_seed(client):
    r = client.completions.create(
        model="tiny", prompt="Once", max_tokens=10, n=3, temperature=1.0, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    r2 = client.completions.create(
        model="tiny", prompt="Once", max_tokens=10, n=3, temperature=1.0, seed=7
    )
    assert [c.text for c in r.choices] == [c.text for c in r2.choices]
    assert len({c.text for c in r.choices}) > 1


def test_logprobs_and_echo(client):
    # Without token healing: it would back off " world" and constrain the first tokens to spell
    # it, and a constrained token is not the most likely one of the (unmasked) logprobs.
    r = client.completions.create(
        model="tiny",
        prompt="Hello world",
        max_tokens=4,
        temperature=0,
        logprobs=3,
        echo=True,
        extra_body={"token_healing": False},
    )
    c = r.choices[0]
    assert c.text.startswith("Hello world")
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    # 2 prompt tokens (BOS left out) + 4 generated
    assert len(lp.tokens) == 2 + 4
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
    # greedy: the chosen token is the most likely one
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-5)


def test_stop_sequence(client):
    full = (
        client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    stop = full[5:8]
    cut = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_token_prompts_and_batches(client):
    r = client.completions.create(
        model="tiny", prompt=[[1, 22557], [1, 15359, 1526]], max_tokens=3, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1]


def test_chat(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(model="nope", prompt="x"), "model"),
        (dict(model="tiny", prompt="x", n=0), "n"),
        (dict(model="tiny", prompt="x", logprobs=6), "logprobs"),
        (dict(model="tiny", prompt="x", temperature=3), "temperature"),
        (dict(model="tiny", prompt="x", stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(model="tiny", prompt="x", suffix="y"), "suffix"),
        (dict(model="tiny", prompt="x", max_tokens=100000), "max_tokens"),
        (dict(model="tiny", prompt="x", logit_bias={"99999999": 1}), "logit_bias"),
    ],
)
def test_bad_requests_are_4xx_openai_errors(client, kwargs, param):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**kwargs)
    assert 400 <= e.value.status_code < 500
    body = e.value.body
    assert body["param"] == param and body["message"]


def test_a_request_past_the_context_length_says_so(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=100000)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "max_tokens")
    assert "maximum context length is 512 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_completion_tokens=600
        )
    assert e.value.code == "context_length_exceeded"


def test_unsupported_chat_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert e.value.body["param"] == "tools"


def test_broken_json_and_wrong_types(server):
    url = server[0]
    r = httpx.post(
        f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": "many"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_ready_reports_what_fp32_matmuls_run_on(server):
    body = httpx.get(f"{server[0]}/ready").json()
    assert body["status"] == "ready"
    blas = body["blas"]
    assert blas["device"] in ("cpu", "gpu") and isinstance(blas["slow"], bool)
    if blas["device"] == "cpu":  # measured, so it is a real speed
        assert blas["gflops"] > 0 and blas["library"]
