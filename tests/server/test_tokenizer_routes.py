"""vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info) on the real server, called
the way lm-evaluation-harness's remote tokenizer calls them: at the root, and under /v1/."""

from __future__ import annotations

import httpx
import jinja2.sandbox
import openai
import pytest

from server.settings import Settings
from tests.serving import start_model_server, start_server

pytestmark = pytest.mark.timeout(300)

API_KEY = "sk-tokenizer-test"


@pytest.fixture(scope="module")
def server(tiny_hf_model, tmp_path_factory):
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=tmp_path_factory.mktemp("data"),
        served_model_name="tiny",
        start_worker=False,
    )
    with start_model_server(settings) as (url, _engine):
        yield url


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server) as client:
        yield client


def _tokenize(http: httpx.Client, path: str = "/tokenize", **body) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_tokenizer_info_has_what_lm_eval_reads(http):
    info = http.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", None)
    assert info["tokenizer_class"] == "LlamaTokenizer" and info["model_max_length"] == 512
    assert http.get("/v1/tokenizer_info").json() == info


def test_special_token_texts_give_their_ids_as_lm_eval_expects(http):
    # lm-eval's remote tokenizer: eos_token_id = encode(eos_token)[0], with add_special_tokens false.
    assert _tokenize(http, prompt="</s>", add_special_tokens=False)["tokens"] == [2]
    assert _tokenize(http, prompt="<s>", add_special_tokens=False)["tokens"] == [1]
    assert _tokenize(http, prompt="a</s>b", add_special_tokens=False)["tokens"] == [264, 2, 287]


def test_tokenize_gives_the_ids_completions_run(http, server):
    text = "table: players\nQ: How many?\nA:"
    body = _tokenize(http, prompt=text, return_token_strs=True)
    assert body["tokens"][0] == 1 and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512 and body["token_strs"][:2] == ["<s>", "▁table"]
    assert _tokenize(http, "/v1/tokenize", prompt=text) == {**body, "token_strs": None}
    without_bos = _tokenize(http, prompt=text, add_special_tokens=False)["tokens"]
    assert without_bos == body["tokens"][1:]

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    usage = client.completions.create(model="tiny", prompt=text, max_tokens=1).usage
    assert usage.prompt_tokens == body["count"]
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": text}
    assert http.post("/v1/detokenize", json={"tokens": without_bos}).json() == {"prompt": text}


def test_chat_tokenize_matches_chat_completions_and_the_served_template(http, server):
    messages = [
        {"role": "system", "content": "Answer in SQL."},
        {"role": "user", "content": "How many players?"},
        {"role": "assistant", "content": "SELECT COUNT(*) FROM players"},
        {"role": "user", "content": "And teams?"},
    ]
    ids = _tokenize(http, messages=messages)["tokens"]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    usage = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage
    assert usage.prompt_tokens == len(ids)

    # A client rendering /tokenizer_info's chat template itself gets the same ids back.
    info = http.get("/tokenizer_info").json()
    template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(info["chat_template"])
    text = template.render(messages=messages, bos_token="<s>", eos_token="</s>")
    assert _tokenize(http, prompt=text, add_special_tokens=False)["tokens"] == ids

    finished = messages[:3]
    closed = _tokenize(http, messages=finished, add_generation_prompt=False)["tokens"]
    assert closed[-1] == 2
    opened = _tokenize(
        http, messages=finished, add_generation_prompt=False, continue_final_message=True
    )
    assert opened["tokens"] == closed[:-1]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
        ("/tokenize", {"prompt": "x", "model": "nope"}, "model"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
            "continue_final_message",
        ),  # fmt: skip
        ("/detokenize", {"tokens": [5, 32000]}, "tokens"),
    ],
)
def test_bad_tokenizer_requests_say_what_to_change(http, path, body, param):
    r = http.post(path, json=body)
    assert 400 <= r.status_code < 500
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_tokenizer_routes_need_the_api_key_when_the_server_has_one(tmp_path):
    with start_server(Settings(data_dir=tmp_path / "data", api_key=API_KEY)) as url:
        for method, path in [("GET", "/tokenizer_info"), ("POST", "/tokenize")]:
            for prefix in ("", "/v1"):
                r = httpx.request(method, f"{url}{prefix}{path}", json={"prompt": "x"})
                assert r.status_code == 401
        keyed = httpx.get(f"{url}/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"})
        assert keyed.status_code == 503  # past the key; this server runs without a model
        assert "without a model" in keyed.json()["error"]["message"]
