"""Run the real app under uvicorn on a free localhost port, for tests that talk HTTP to it.

    with start_server(Settings(data_dir=tmp_path)) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")

The server runs in a background thread with the same uvicorn settings as `loraforge serve`
(only logging is left to pytest); leaving the block shuts it down gracefully, lifespan included.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from litestar.types import ASGIApp

from server.app import Service, create_app, uvicorn_config
from server.engine_client import EngineClient
from server.metrics import Metrics
from server.settings import Settings


@contextmanager
def start_server(
    settings: Settings,
    engine: EngineClient | None = None,
    *,
    services: Sequence[Service] = (),
    metrics: Metrics | None = None,
    adapter_registry: Any = None,
    startup_timeout_s: float = 60.0,
) -> Iterator[str]:
    """Serve `create_app(settings, ...)` and yield its base URL, e.g. http://127.0.0.1:40123."""
    app = create_app(
        settings,
        engine=engine,
        services=services,
        metrics=metrics,
        adapter_registry=adapter_registry,
    )
    with serve(app, settings, startup_timeout_s=startup_timeout_s) as base_url:
        yield base_url


@contextmanager
def serve(
    app: ASGIApp, settings: Settings | None = None, *, startup_timeout_s: float = 60.0
) -> Iterator[str]:
    """Serve any ASGI app the way `loraforge serve` would; yield its base URL."""
    settings = settings or Settings()
    # Bind here and hand uvicorn the socket: no window in which another process takes the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, settings, host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    # uvicorn installs no signal handlers outside the main thread, so pytest keeps Ctrl-C.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server failed to start: its log above says why")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test server did not start in {startup_timeout_s} s")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=config.timeout_graceful_shutdown or 30)
        sock.close()


@contextmanager
def start_model_server(
    settings: Settings, ready_timeout_s: float = 120.0
) -> Iterator[tuple[str, Any]]:
    """`loraforge serve` in-process: engine, adapter registry and worker as the CLI wires them.
    Yields (base URL, the EngineClient) once the model is loaded."""
    import anyio

    from server.cli.serve import build_services

    metrics, registry, engine, services = build_services(settings)
    with start_server(
        settings, engine, services=services, metrics=metrics, adapter_registry=registry
    ) as base_url:
        anyio.run(engine.wait_ready, ready_timeout_s)
        yield base_url, engine


def sse_lines(response: httpx.Response) -> Iterator[str]:
    """The stream's lines as SSE defines them (ended by a newline, a carriage return before it dropped). Not
    httpx's iter_lines: str.splitlines also breaks at U+2028 and other separators, which the random
    test model writes and JSON leaves unescaped inside a data line."""
    pending = ""
    for text in response.iter_text():
        pending += text
        *done, pending = pending.split("\n")
        for line in done:
            yield line.removesuffix("\r")
    if pending:
        yield pending
