"""SIGTERM to a real `loraforge serve`: streams still open after the grace period end with an
OpenAI error event and [DONE] (never cut silently), and the process exits with status 0."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from tests.jobs.test_jobs_crash import free_port, loraforge
from tests.serving import sse_lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize("grace_s", [0, 60])
def test_sigterm_mid_stream(tiny_hf_model, tmp_path, grace_s):
    """With no grace left the open stream ends with an error event and [DONE]; within the grace
    it finishes its answer. Either way the process exits with status 0."""
    port = free_port()
    log = tmp_path / "serve.log"
    proc = loraforge(
        "serve",
        "--model",
        str(tiny_hf_model),
        "--served-model-name",
        "tiny",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
        "--no-start-worker",
        "--shutdown-grace-s",
        str(grace_s),
        log=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "loraforge serve was not ready in 90 s"
            time.sleep(0.2)
        body = {
            "model": "tiny",
            "prompt": "SELECT",
            "max_tokens": 480,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = sse_lines(r)
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            proc.send_signal(signal.SIGTERM)
            payloads = [line[6:] for line in lines if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]", payloads[-3:]
        last = json.loads(payloads[-2])
        if grace_s == 0:
            assert last["error"]["code"] == "server_shutdown", last
        else:
            assert last["choices"][0]["finish_reason"] == "length", last
            assert not any("error" in json.loads(p) for p in payloads[:-1])
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
