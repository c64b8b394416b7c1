"""Hot-swapped LoRA adapters under concurrent load, against the engine serving each alone."""

from __future__ import annotations

import io
import re
import tarfile
import threading
import time

import httpx
import openai
import pytest

from mlx_core.engine import Engine
from mlx_core.lora.formats import save_adapter
from mlx_core.lora.slots import AdapterSlots
from mlx_core.sampling import SamplingParams
from mlx_core.weights import load_model
from server.settings import Settings
from tests.engine.test_lora import random_adapter
from tests.serving import start_model_server

pytestmark = pytest.mark.timeout(600)

PROMPTS = [
    "table: 1-1\ncolumns: Player, Team\nQ: who?\nA:",
    "Hello there",
    "SELECT",
    "The quick brown",
]


@pytest.fixture(scope="module")
def adapters(tiny_model):
    args = tiny_model.args
    return {
        "qv": random_adapter(args, ("q_proj", "v_proj"), (0, 1), rank=4, seed=1),
        "mlp": random_adapter(args, ("gate_proj", "down_proj"), (1,), rank=8, seed=2),
        "kvo": random_adapter(
            args, ("k_proj", "v_proj", "o_proj"), (0,), rank=2, seed=3, scale=1.0
        ),
    }


@pytest.fixture(scope="module")
def server(tiny_hf_model, tmp_path_factory, adapters):
    data = tmp_path_factory.mktemp("data")
    for name, a in adapters.items():
        save_adapter(data / "incoming" / name, a)
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=data,
        served_model_name="tiny",
        start_worker=False,
        max_loaded_adapters=2,
        max_num_seqs=8,
    )
    with start_model_server(settings) as (url, _engine):
        r = httpx.post(f"{url}/v1/adapters", json={"name": "qv", "path": "incoming/qv"})
        assert r.status_code == 201, r.text
        r = httpx.post(
            f"{url}/v1/load_lora_adapter",
            json={"lora_name": "mlp", "lora_path": str(data / "incoming/mlp")},
        )
        assert r.status_code == 200 and "Success" in r.text
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            t.add(data / "incoming" / "kvo", arcname="kvo")
        r = httpx.post(
            f"{url}/v1/adapters",
            data={"name": "kvo"},
            files={"file": ("kvo.tar.gz", buf.getvalue(), "application/gzip")},
        )
        assert r.status_code == 201, r.text
        yield url, data


def reference(model_dir, adapters, model: str, prompt: str, max_tokens: int) -> list[int]:
    """What the engine generates for this adapter alone (a fresh engine, one request)."""
    loaded = load_model(model_dir)
    slots = AdapterSlots(loaded.model, 1, 16, adapters.__getitem__)
    engine = Engine(loaded.model, loaded.tokenizer, adapter_slots=slots)
    ids = loaded.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
    outs = list(engine.generate(ids, params, None if model == "tiny" else model))
    return [t for o in outs for t in o.tokens], [o.logprobs[0] for o in outs]


def test_models_lists_adapters(server):
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x")
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "tiny" and set(ids[1:]) == {"qv", "mlp", "kvo"}
    card = client.models.retrieve("mlp")
    assert card.model_extra["parent"] == "tiny"


def test_concurrent_mixed_adapters_match_each_alone(server, tiny_hf_model, adapters):
    url, _ = server
    models = ["tiny", "qv", "mlp", "kvo"]
    jobs = [(models[i % 4], PROMPTS[(i // 4) % 4]) for i in range(16)]
    expected = {(m, p): reference(tiny_hf_model, adapters, m, p, 12) for m, p in set(jobs)}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(jobs))

    def run(i: int, model: str, prompt: str) -> None:
        barrier.wait()
        # The reference runs the prompt as given: no token healing here either.
        results[i] = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            logprobs=2,
            extra_body={"token_healing": False},
        )

    threads = [threading.Thread(target=run, args=(i, m, p)) for i, (m, p) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tok = load_model(tiny_hf_model).tokenizer
    for i, (m, p) in enumerate(jobs):
        want_tokens, want_lps = expected[(m, p)]
        got = results[i].choices[0].logprobs
        want_text = [tok.token_text(t) for t in want_tokens]
        for k, (g, w) in enumerate(zip(got.tokens, want_text)):
            if g != w:
                # Batched arithmetic may only flip a near-tie of the top two logits.
                top = sorted(want_lps[k].top, key=lambda x: -x[1])
                assert abs(top[0][1] - top[1][1]) < 1e-3, (m, p, k, g, w)
                break
            assert got.token_logprobs[k] == pytest.approx(want_lps[k].logprob, abs=1e-3)
        else:
            assert len(got.tokens) == len(want_text)


def test_constrained_answers_through_adapters(server):
    """Structured outputs in a batch of rows on different adapters: each answer matches."""
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    results: dict[int, str] = {}
    models = ["tiny", "qv", "mlp", "kvo"]

    def run(i: int) -> None:
        body = (
            {"guided_regex": "[a-z]{2,5}-[0-9]{2}"} if i % 2 else {"guided_choice": ["yes", "no"]}
        )
        r = client.completions.create(
            model=models[i % 4],
            prompt=PROMPTS[i % 4],
            max_tokens=20,
            temperature=0.8,
            seed=i,
            extra_body=body,
        )
        results[i] = r.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, text in results.items():
        assert re.fullmatch("[a-z]{2,5}-[0-9]{2}", text) if i % 2 else text in ("yes", "no"), text
    assert len(results) == 8


def test_unload_while_streaming(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    stream = client.completions.create(
        model="qv", prompt="Hello", max_tokens=40, temperature=0, stream=True
    )
    first = next(iter(stream))
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "qv"})
    assert r.status_code == 200
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    assert first.choices
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="qv", prompt="x", max_tokens=2)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"name": "bad name!", "path": "incoming/mlp"}, 400, "name"),
        ({"name": "escape", "path": "/etc"}, 400, "path"),
        ({"name": "mlp2", "path": "../"}, 400, "path"),
        ({"name": "missing", "path": "incoming/none"}, 400, "path"),
        ({"name": "nul", "path": "incoming/\u0000mlp"}, 400, "path"),
        ({"name": "deep", "path": "a/" * 50_000}, 400, "path"),
        ({"name": "mlp", "path": "incoming/mlp"}, 409, "name"),
    ],
)
def test_bad_adapter_registrations(server, body, status, param):
    r = httpx.post(f"{server[0]}/v1/adapters", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_unsafe_archives_are_refused(server):
    for member in ("../evil.json", "/abs.json"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            info = tarfile.TarInfo(member)
            info.size = 2
            t.addfile(info, io.BytesIO(b"{}"))
        r = httpx.post(
            f"{server[0]}/v1/adapters",
            data={"name": "evil"},
            files={"file": ("a.tgz", buf.getvalue(), "application/gzip")},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_archive"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    r = httpx.post(
        f"{server[0]}/v1/adapters",
        data={"name": "evil"},
        files={"file": ("a.tar", buf.getvalue(), "application/x-tar")},
    )
    assert r.status_code == 400


def test_adapter_for_another_model_is_refused(server, tmp_path):
    from mlx_core.config import ModelArgs

    other = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=32000)
    data = server[1]
    save_adapter(data / "incoming" / "other", random_adapter(other, ("q_proj",), (0,)))
    r = httpx.post(f"{server[0]}/v1/adapters", json={"name": "other", "path": "incoming/other"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"


def test_prefix_cache_reuses_a_shared_header(server):
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x")
    header = "table: 1-10015132-16\ncolumns: Player, No., Nationality, Position, Years in Toronto, School/Club Team\n"
    client.completions.create(
        model="tiny", prompt=header + "Q: What is terrence ross' nationality\nA:", max_tokens=2
    )
    r = client.completions.create(
        model="tiny", prompt=header + "Q: which club was in toronto 2003-06\nA:", max_tokens=2
    )
    assert r.usage.prompt_tokens_details.cached_tokens >= 16


def test_disconnect_frees_the_slot(server):
    url, _ = server
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": "Hi", "max_tokens": 400, "stream": True, "temperature": 0},
    ) as r:
        for _ in r.iter_lines():
            break
    deadline = time.monotonic() + 10
    while running_requests(url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_requests(url) == 0


def running_requests(url: str) -> float:
    """The server's own count of requests in the running batch, from GET /metrics."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("loraforge_num_requests_running "):
            return float(line.split()[1])
    raise AssertionError("GET /metrics has no loraforge_num_requests_running")


def test_queue_full_is_429(tiny_hf_model, tmp_path):
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=tmp_path,
        served_model_name="tiny",
        start_worker=False,
        max_num_seqs=1,
        max_queue=1,
    )
    with start_model_server(settings) as (url, _):
        statuses, headers = [], []

        def call() -> None:
            r = httpx.post(
                f"{url}/v1/completions",
                json={"model": "tiny", "prompt": "Hi", "max_tokens": 200, "temperature": 0},
                timeout=60,
            )
            statuses.append(r.status_code)
            headers.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses
        assert any(h for s, h in zip(statuses, headers) if s == 429)


def test_more_sequences_than_the_server_holds_is_400(tiny_hf_model, tmp_path):
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=tmp_path,
        served_model_name="tiny",
        start_worker=False,
        max_num_seqs=2,
        max_queue=2,
        kv_cache_memory_gb=0.0001,
    )
    with start_model_server(settings) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "n": 5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "Hi", "n": 4, "max_tokens": 400},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = httpx.post(
            f"{url}/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4}
        )
        assert r.status_code == 200


def test_load_inplace_replaces_only_after_the_new_adapter_validates(server):
    url, data = server
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "mlp", "lora_path": "incoming/none", "load_inplace": True},
    )
    assert r.status_code == 400
    names = [a["id"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]]
    assert "mlp" in names  # the bad replacement left the old one in place
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "mlp", "lora_path": str(data / "incoming/kvo"), "load_inplace": True},
    )
    assert r.status_code == 200
    mlp = [a for a in httpx.get(f"{url}/v1/adapters").json()["data"] if a["id"] == "mlp"][0]
    assert mlp["targets"] == ["k_proj", "v_proj", "o_proj"] and mlp["source_format"] == "loraforge"
