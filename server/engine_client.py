"""The bridge between async HTTP handlers and the one engine thread that owns the model.

Handlers call `EngineService.generate(requests)` and iterate the outputs as they come; the engine
thread runs `Engine.step()` in a loop and hands each step's outputs to the right request's asyncio
queue. A handler that stops iterating (the client went away) aborts its requests, which frees
their batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import anyio.to_thread

from mlx_core.engine import Engine, EngineError, GenerationOutput, GenerationRequest
from mlx_core.lora.layers import Adapter
from mlx_core.lora.slots import AdapterSlots
from mlx_core.weights import LoadedModel, load_model
from server.errors import BadRequestError, RateLimitError, ServiceUnavailableError
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("loraforge.scheduler")

_IDLE_WAIT_S = 0.5


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    submitted: float
    first_token: float | None = None


class EngineService:
    """Loads the model at startup and serves generation requests from a dedicated thread."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        adapter_loader: Callable[[str], Adapter] | None = None,
    ) -> None:
        self.settings, self.metrics = settings, metrics
        self.adapter_loader = adapter_loader
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.slots: AdapterSlots | None = None
        self.model_id = settings.served_model_name or ""
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._loaded = threading.Event()
        self.load_error: Exception | None = None
        self.started_at = int(time.time())

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and not self._stopping

    async def start(self) -> None:
        """Load the model and start the engine thread in the background: /health answers at
        once, /ready and completions wait for `ready`. `wait_ready()` waits for it."""
        self.started_at = int(time.time())
        self._thread = threading.Thread(
            target=self._load_and_run, name="loraforge-engine", daemon=True
        )
        self._thread.start()
        metrics = self.metrics
        metrics.running_requests.set_function(lambda: self.engine.num_running if self.engine else 0)
        metrics.waiting_requests.set_function(self._waiting)

    def _load_and_run(self) -> None:
        try:
            self._load()
        except Exception as e:
            self.load_error = e
            log.error("cannot load the model: %s", e)
            self._loaded.set()
            return
        self._loaded.set()
        self._run()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the model is loaded; raise its load error if loading failed."""
        await anyio.to_thread.run_sync(self._loaded.wait, timeout)
        if self.load_error is not None:
            raise self.load_error

    def _load(self) -> None:
        from server.cli.model import resolve_model_path

        path = resolve_model_path(self.settings.model)
        self.loaded = load_model(path)
        self.model_id = self.settings.base_model_id()
        s = self.settings
        if self.adapter_loader is not None:
            self.slots = AdapterSlots(
                self.loaded.model, s.max_loaded_adapters, s.max_lora_rank, self.adapter_loader
            )
        args = self.loaded.args
        kv_tokens = None
        if s.kv_cache_memory_gb:
            per_token = (
                2 * args.n_layers * args.n_kv_heads * args.head_dim * _dtype_bytes(self.loaded)
            )
            kv_tokens = int(s.kv_cache_memory_gb * 1e9 / per_token)
        block = 16
        prefix_tokens = 0
        if s.prefix_cache_mb:
            per_token = (
                2 * args.n_layers * args.n_kv_heads * args.head_dim * _dtype_bytes(self.loaded)
            )
            prefix_tokens = max(block, int(s.prefix_cache_mb * 2**20 / per_token))
        self.engine = Engine(
            self.loaded.model,
            self.loaded.tokenizer,
            max_num_seqs=s.max_num_seqs,
            max_model_len=s.max_model_len,
            kv_budget_tokens=kv_tokens,
            prefix_cache_tokens=prefix_tokens,
            adapter_slots=self.slots,
        )
        log.info(
            "serving %s from %s (%s, max context %d)",
            self.model_id,
            path,
            self.loaded.source_format,
            self.engine.max_model_len,
        )

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._thread.join, 30)

    def _waiting(self) -> float:
        with self._lock:
            n = len(self._streams)
        return max(0, n - (self.engine.num_running if self.engine else 0))

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not (self._stopping and not self._streams):
            if not engine.has_work():
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outs = engine.step()
            except Exception as e:  # a bug must not take the service down: fail what was running
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                continue
            self._deliver(outs)

    def _deliver(self, outs: Sequence[GenerationOutput]) -> None:
        now = time.perf_counter()
        for out in outs:
            with self._lock:
                stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.first_token is None and out.tokens:
                stream.first_token = now
                self.metrics.time_to_first_token.observe(now - stream.submitted)
            self.metrics.generation_tokens.inc(len(out.tokens), model=self.model_id)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams = list(self._streams.values())
        self.engine.reset()
        for s in streams:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, error)

    # -- called from request handlers --------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns():x}"

    def require_ready(self) -> None:
        """Raise the 503 that explains why requests cannot be served yet (or at all)."""
        if self.load_error is not None:
            raise ServiceUnavailableError(
                f"the model failed to load ({self.load_error}): restart the "
                "server with a working --model",
                code="model_load_failed",
            )
        if not self.ready:
            raise ServiceUnavailableError(
                "the model is not loaded yet (or the server is shutting down): retry shortly",
                retry_after_s=5,
                code="model_loading",
            )

    def generate(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """Submit requests together (errors raise here, before any response is started) and
        return an async iterator of (index in `requests`, output) until all finish. Closing the
        iterator early aborts what is still running."""
        self.require_ready()
        s = self.settings
        for r in requests:
            try:
                self.engine.check_request(r)
            except EngineError as e:
                too_long = "context length" in str(e)
                raise BadRequestError(
                    str(e),
                    param="max_tokens" if too_long else "prompt",
                    code="context_length_exceeded" if too_long else None,
                ) from e
        capacity = s.max_num_seqs + s.max_queue
        if len(requests) > capacity:
            raise BadRequestError(
                f"this request asks for {len(requests)} sequences (n x prompts), more than this server "
                f"holds at once ({s.max_num_seqs} running + {s.max_queue} queued): lower n or send "
                "fewer prompts per request",
                param="n",
            )
        budget = self.engine.kv_budget_tokens
        need = sum(len(r.prompt) + r.params.max_tokens for r in requests)
        if budget and need > budget:
            raise BadRequestError(
                f"this request needs {need} tokens of KV cache (n x (prompt + max_tokens)), more than "
                f"the server's budget of {budget} (--kv-cache-memory-gb): lower n or max_tokens",
                param="max_tokens",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        now = time.perf_counter()
        with self._lock:
            if len(self._streams) + len(requests) > s.max_num_seqs + s.max_queue:
                raise RateLimitError(
                    f"the server is at capacity ({s.max_num_seqs} running, "
                    f"{s.max_queue} queued): retry shortly",
                    retry_after_s=1,
                )
            for i, r in enumerate(requests):
                self._streams[r.request_id] = _Stream(loop, queue, i, now)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in requests), model=self.model_id)
        for r in requests:
            self.engine.add_request(r)
        self._wake.set()
        return self._outputs(requests, queue)

    async def _outputs(self, requests: Sequence[GenerationRequest], queue: asyncio.Queue):
        index = {r.request_id: i for i, r in enumerate(requests)}
        pending = set(index)
        try:
            while pending:
                out = await queue.get()
                if isinstance(out, Exception):
                    raise ServiceUnavailableError(
                        f"generation failed ({out}); retry the request"
                    ) from out
                if out.finish_reason:
                    pending.discard(out.request_id)
                yield index[out.request_id], out
        finally:
            for rid in pending:  # the client left early: free the slots now
                self.engine.abort(rid)
            self._wake.set()
            with self._lock:
                for r in requests:
                    self._streams.pop(r.request_id, None)

    async def run_on_engine(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread (adapter loading, prompt scoring) and wait for it."""
        fut = self.engine.call(fn)
        self._wake.set()
        return await asyncio.wrap_future(fut)


def _dtype_bytes(loaded: LoadedModel) -> int:
    return loaded.model.model.norm.weight.dtype.size
