"""One request's fault stays its own, and nothing slow freezes the server: bad inputs among good
streams, adapters deleted mid-stream, archives that are bombs or broken, /health under load."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mlx_core.lora.formats import save_adapter
from server.settings import Settings
from tests.engine.test_lora import random_adapter
from tests.serving import sse_lines, start_model_server

pytestmark = pytest.mark.timeout(600)

GOOD = {"model": "tiny", "prompt": "SELECT", "max_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_hf_model, tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    adapter = random_adapter(tiny_model.args, ("q_proj", "v_proj"), (0, 1), rank=4, seed=1)
    save_adapter(data / "incoming" / "qv", adapter)
    settings = Settings(
        model=str(tiny_hf_model),
        data_dir=data,
        served_model_name="tiny",
        start_worker=False,
        max_num_seqs=16,
    )
    with start_model_server(settings) as (url, engine):
        yield url, data, engine


def events(url: str, body: dict, route: str = "completions") -> list[str]:
    """The `data:` payloads of one streamed answer (the last is [DONE] when it ended well)."""
    with httpx.stream("POST", f"{url}/v1/{route}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return [line[6:] for line in sse_lines(r) if line.startswith("data: ")]


def assert_finished(payloads: list[str]) -> None:
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert not any("error" in c for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def with_good_streams(url: str, n: int, action):
    """Run `action()` while `n` good streams are in flight; its result once all streams ended
    well."""
    with ThreadPoolExecutor(n + 1) as pool:
        streams = [pool.submit(events, url, GOOD) for _ in range(n)]
        time.sleep(0.05)  # let them join the batch
        result = action()
        for s in streams:
            assert_finished(s.result())
    return result


@pytest.mark.parametrize(
    "route, body, status, param",
    [
        ("completions", {"prompt": "Hi", "seed": -1}, 400, "seed"),
        ("completions", {"prompt": "Hi", "seed": 2**64}, 400, "seed"),
        ("completions", {"prompt": "Hi", "seed": 2**64 - 1, "n": 2}, 400, "seed"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "seed": -1},
            400,
            "seed",
        ),
        ("completions", {"prompt": ["a", 1]}, 400, "prompt"),
        ("completions", {"prompt": [1, [2, 3]]}, 400, "prompt"),
        ("completions", {"prompt": [5, 10**9]}, 400, "prompt"),
        ("completions", {"prompt": [[5], [-1]]}, 400, "prompt"),
        ("completions", {"prompt": "a\u0000b", "max_tokens": 2}, 200, None),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "\u0000"}], "max_tokens": 2},
            200,
            None,
        ),
        ("completions", {"prompt": "Hi", "model": "no\u0000such"}, 404, "model"),
        ("completions", {"prompt": "Hi", "max_tokens": 100_000}, 400, "max_tokens"),
        ("completions", {"prompt": "hi " * 2000, "echo": True, "logprobs": 1}, 400, None),
    ],
)
def test_a_bad_request_fails_alone(server, route, body, status, param):
    url, _, _ = server

    def bad():
        return httpx.post(f"{url}/v1/{route}", json={"model": "tiny", **body}, timeout=60)

    r = with_good_streams(url, 8, bad)
    assert r.status_code == status, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param


MARK = 31999  # a token id only the failing request's prompt holds


@pytest.mark.parametrize("stream", [True, False])
def test_an_engine_fault_of_one_row_ends_that_request_only(server, monkeypatch, stream):
    url, _, client = server
    engine = client._engine
    real = engine._new_sequence

    def fragile(req, row):
        if MARK in req.prompt:
            raise RuntimeError("this row's sampler broke")
        return real(req, row)

    monkeypatch.setattr(engine, "_new_sequence", fragile)
    bad = {"model": "tiny", "prompt": [1, MARK], "max_tokens": 4}

    def send():
        if stream:
            return events(url, bad)
        return httpx.post(f"{url}/v1/completions", json=bad, timeout=60)

    result = with_good_streams(url, 8, send)
    if stream:
        assert result[-1] == "[DONE]"
        chunks = [json.loads(p) for p in result[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "error"
        assert chunks[-1]["error"]["code"] == "engine_error"
    else:
        assert result.status_code == 500 and result.json()["error"]["code"] == "engine_error"


def test_an_adapter_whose_stored_weights_rot_fails_only_its_requests(server):
    url, data, _ = server
    r = httpx.post(f"{url}/v1/adapters", json={"name": "rot", "path": "incoming/qv"})
    assert r.status_code == 201, r.text
    (Path(r.json()["path"]) / "adapters.safetensors").write_bytes(b"garbage" * 10)

    def ask():
        body = {"model": "rot", "prompt": "Hi", "max_tokens": 2}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    r = with_good_streams(url, 8, ask)
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error", r.text
    assert str(data) not in r.text
    assert httpx.delete(f"{url}/v1/adapters/rot").status_code == 200


def test_an_adapter_deleted_mid_stream_finishes_and_new_requests_get_404(server):
    url, _, _ = server
    r = httpx.post(f"{url}/v1/adapters", json={"name": "doomed", "path": "incoming/qv"})
    assert r.status_code == 201, r.text
    body = {"model": "doomed", "prompt": "SELECT", "max_tokens": 200, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as stream:
        lines = sse_lines(stream)
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
        assert httpx.delete(f"{url}/v1/adapters/doomed").status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert_finished(rest)


@pytest.mark.slow
def test_adapter_churn_gives_no_5xx(server):
    """Register and delete one adapter in a loop while requests name it and the base model."""
    url, _, _ = server
    stop = threading.Event()
    statuses: dict[str, list[int]] = {"tiny": [], "churn": []}

    def churn():
        while not stop.is_set():
            httpx.post(f"{url}/v1/adapters", json={"name": "churn", "path": "incoming/qv"})
            time.sleep(0.02)
            httpx.delete(f"{url}/v1/adapters/churn")

    def ask(model: str):
        while not stop.is_set():
            body = {"model": model, "prompt": "Hi", "max_tokens": 4}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            statuses[model].append(r.status_code)

    threads = [threading.Thread(target=churn)]
    threads += [threading.Thread(target=ask, args=(m,)) for m in ("tiny", "churn", "churn", "tiny")]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(60)
    assert statuses["tiny"] and set(statuses["tiny"]) == {200}
    assert statuses["churn"] and set(statuses["churn"]) <= {200, 404}


def upload(url: str, name: str, filename: str, payload: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/adapters",
        data={"name": name},
        files={"file": (filename, payload, "application/octet-stream")},
        timeout=120,
    )


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def tar_bomb(declared: int) -> bytes:
    """A .tar.gz whose one member is `declared` zero bytes (it compresses ~1000x)."""
    header = tarfile.TarInfo("adapter/adapters.safetensors")
    header.size = declared
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        gz.write(header.tobuf())
        zeros = bytes(1 << 20)
        for _ in range(declared >> 20):
            gz.write(zeros)
        gz.write(bytes(1024))  # padding and the end-of-archive blocks
    return raw.getvalue()


def test_broken_and_hostile_archives_are_400(server):
    url, data, _ = server
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w:gz") as t:
        t.add(data / "incoming" / "qv", arcname="qv")
    bad_crc = io.BytesIO()
    with zipfile.ZipFile(bad_crc, "w") as z:
        z.writestr("qv/adapter_config.json", "{}" * 100)
    crc = bytearray(bad_crc.getvalue())
    at = crc.index(b"{}{}")
    crc[at] = ord("[")  # the data no longer matches its CRC-32
    cases = {
        "file then folder.tgz": tar_gz([member("a", b"x"), member("a/b", b"y")]),
        "folder then file.tgz": tar_gz([member("a", kind=tarfile.DIRTYPE), member("a", b"y")]),
        "truncated.tgz": good.getvalue()[: len(good.getvalue()) // 2],
        "bad crc.zip": bytes(crc),
        "symlink.tgz": tar_gz([member("qv/adapters.safetensors", kind=tarfile.SYMTYPE)]),
        "hardlink.tgz": tar_gz([member("qv/a", b"x"), member("qv/b", kind=tarfile.LNKTYPE)]),
        "bomb.tgz": tar_bomb(64 << 20),
    }
    for filename, payload in cases.items():
        r = upload(url, "hostile", filename, payload)
        assert r.status_code == 400, (filename, r.text)
        error = r.json()["error"]
        assert error["param"] == "file", (filename, error)
        assert str(data) not in error["message"], (filename, error)
    assert upload(url, "fine", "qv.tgz", good.getvalue()).status_code == 201


def test_links_in_an_adapter_folder_are_refused(server, tmp_path):
    url, data, _ = server
    outside = tmp_path / "secret"
    outside.write_text("not yours")
    folders = {}
    for kind in ("symlink", "hardlink"):
        folder = data / "incoming" / f"linked-{kind}"
        save_adapter(folder, random_adapter_like(data))
        if kind == "symlink":
            (folder / "notes.txt").symlink_to(outside)
        else:
            (data / "original.txt").write_text("x")
            (folder / "notes.txt").hardlink_to(data / "original.txt")
        folders[kind] = folder
    (data / "incoming" / "via-link").symlink_to(data / "incoming" / "qv")
    for name, path in [
        ("s", "incoming/linked-symlink"),
        ("h", "incoming/linked-hardlink"),
        ("v", "incoming/via-link"),
    ]:
        r = httpx.post(f"{url}/v1/adapters", json={"name": name, "path": path})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "path" and str(data) not in error["message"], error
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "s", "lora_path": "incoming/linked-symlink"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"


def random_adapter_like(data: Path):
    from mlx_core.lora.formats import load_adapter

    return load_adapter(data / "incoming" / "qv")


def test_a_broken_adapter_file_names_it_relative_to_the_data_dir(server):
    url, data, _ = server
    folder = data / "incoming" / "garbage"
    folder.mkdir(parents=True)
    (folder / "adapters.safetensors").write_bytes(b"garbage" * 10)
    (folder / "adapter_config.json").write_text(
        (data / "incoming" / "qv" / "adapter_config.json").read_text()
    )
    r = httpx.post(f"{url}/v1/adapters", json={"name": "garbage", "path": "incoming/garbage"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert str(data) not in message and "[load" not in message, message


@pytest.mark.slow
def test_health_answers_fast_under_a_tar_bomb_and_a_10_mb_prompt(server):
    url, _, _ = server
    latencies: list[float] = []
    stop = threading.Event()

    def probe():
        with httpx.Client() as client:
            while not stop.is_set():
                start = time.perf_counter()
                assert client.get(f"{url}/health", timeout=30).status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.05)

    # Built before probing: the client shares this process (and its GIL) with the server.
    big = ("SELECT name FROM users WHERE id = 42; " * 300_000)[:10_000_000]
    body = json.dumps({"model": "tiny", "prompt": big, "max_tokens": 1}).encode()
    bomb = tar_bomb(200 << 20)
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            prompt = pool.submit(
                httpx.post,
                f"{url}/v1/completions",
                content=body,
                headers={"content-type": "application/json"},
                timeout=300,
            )
            archive = pool.submit(upload, url, "bomb", "bomb.tgz", bomb)
            assert archive.result().status_code == 400
            r = prompt.result()
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        stop.set()
        prober.join(60)
    assert len(latencies) > 5
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
