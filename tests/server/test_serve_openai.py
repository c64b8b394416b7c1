"""The real server on a free port, driven by the official `openai` SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.settings import Settings
from tests.scoring import logprob_sum
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
    # As in OpenAI's and vLLM's answers, the first echoed token has no logprob and no top ones.
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value <= 0 and 1 <= len(top) <= 3
    # greedy: the chosen token is the most likely one
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-5)


def _echo(client, prompt, max_tokens=1, **kwargs):
    """A scoring request as lm-eval sends it: the prompt's logprobs, greedy, one token or none."""
    return client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=1,
        echo=True,
        **kwargs,
    ).choices[0]


def test_text_offset_counts_characters_of_the_returned_text(client):
    c = _echo(client, "SELECT COUNT", max_tokens=3)
    lp = c.logprobs
    # " SE" "LECT" " CO" "UNT": the space sentencepiece puts before "SE" is not in the text.
    assert c.text.startswith("SELECT COUNT")
    assert lp.tokens[:4] == [" SE", "LECT", " CO", "UNT"] and lp.text_offset[:4] == [0, 2, 6, 9]
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert c.text[offset:].startswith(token.lstrip() if offset == 0 else token)
    assert lp.text_offset[4] == len("SELECT COUNT")  # the first generated token starts there


def test_max_tokens_0_with_echo_scores_the_prompt_only(client):
    scored = _echo(client, "SELECT COUNT", max_tokens=0)
    assert scored.text == "SELECT COUNT" and scored.finish_reason == "length"
    lp = scored.logprobs
    assert lp.tokens == [" SE", "LECT", " CO", "UNT"] and lp.token_logprobs[0] is None
    # The same numbers as the prompt part of a request that also generates one token.
    one = _echo(client, "SELECT COUNT", max_tokens=1).logprobs
    assert one.token_logprobs[:4] == lp.token_logprobs and len(one.tokens) == 5

    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="SELECT COUNT",
            max_tokens=0,
            logprobs=1,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == "SELECT COUNT"
    assert streamed[-1].finish_reason == "length"
    assert [v for c in streamed if c.logprobs for v in c.logprobs.token_logprobs] == (
        lp.token_logprobs
    )
    assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == 5


def test_token_id_prompts_score_like_text_with_one_bos(client, server, tiny_model):
    """lm-eval sends token ids without BOS (tokenized_requests) or the text; a client that puts
    BOS first sends one more token, and gets it echoed so its own counts still line up."""
    text = "table: players\nQ: How many?\nA: SELECT COUNT(*) FROM players"
    ids = tiny_model.tokenizer.encode(text, add_bos=False)
    n_context = len(tiny_model.tokenizer.encode("table: players\nQ: How many?\nA:", add_bos=False))
    as_text = _echo(client, text).logprobs
    as_ids = _echo(client, ids).logprobs
    with_bos = _echo(client, [1, *ids]).logprobs
    assert len(as_text.tokens) == len(as_ids.tokens) == len(ids) + 1
    assert as_ids.token_logprobs == as_text.token_logprobs
    assert len(with_bos.tokens) == len(ids) + 2 and with_bos.tokens[0] == "<s>"
    assert with_bos.token_logprobs[0] is None
    assert with_bos.token_logprobs[2:] == as_text.token_logprobs[1:]
    # lm-eval's sum, token_logprobs[ctxlen:-1], is the model's own score of the continuation.
    expected = logprob_sum(tiny_model, [1, *ids], 1 + n_context)
    assert sum(as_ids.token_logprobs[n_context:-1]) == pytest.approx(expected, abs=1e-3)
    assert sum(with_bos.token_logprobs[1 + n_context : -1]) == pytest.approx(expected, abs=1e-3)


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
        (dict(model="tiny", prompt=""), "prompt"),
        (dict(model="tiny", prompt=["x", ""]), "prompt"),
        (dict(model="tiny", prompt="x", max_tokens=0), "max_tokens"),
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
