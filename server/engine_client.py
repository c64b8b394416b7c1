"""The server's one way to the engine: `EngineClient`, in the spirit of vLLM's.

It loads the model at startup and runs `Engine.step()` in a loop on the one engine thread that
owns all MLX state; handlers call `generate(requests)` and iterate the outputs as they come, each
step's outputs handed to the right request's asyncio queue. A handler that stops iterating (the
client went away) aborts its requests, which frees their batch slots at the next step. Scoring a
prompt and adapter work (storing, unloading) run on the engine thread too, between two steps.
Nothing else in the server touches the engine, its cache or the model's tensors; engine refusals
come back as the HTTP errors their `EngineError.kind` calls for.

A row the engine ended with finish_reason "error" fails its own request only: its error becomes
that request's 4xx (or 500 for an engine fault), raised after the output that carries it, so a
stream can close its choice before the error event. On shutdown (`begin_shutdown`) new requests
get 503 with Retry-After, and streams still open after the grace period end with an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio.to_thread

from mlx_core.config import ModelArgs
from mlx_core.cpu_blas import BlasReport, report_blas
from mlx_core.demo import resolve_model_path
from mlx_core.engine import Engine, EngineError, GenerationOutput, GenerationRequest, TokenLogprob
from mlx_core.errors import LoraforgeError
from mlx_core.lora.layers import Adapter
from mlx_core.lora.slots import AdapterSlots
from mlx_core.tokenizer import Tokenizer
from mlx_core.weights import LoadedModel, load_model
from server.errors import (
    APIError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
)
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("loraforge.scheduler")

T = TypeVar("T")

_IDLE_WAIT_S = 0.5
# A positive --prefix-cache-mb smaller than one prefix block still caches one block (16 tokens).
_PREFIX_BLOCK_TOKENS = 16


@dataclass(frozen=True)
class ModelInfo:
    """The served base model as routes and the adapter registry see it: id and shapes."""

    id: str  # what clients send as `model`
    args: ModelArgs  # shapes adapters are checked against
    max_model_len: int  # prompt + completion tokens one request may use


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    submitted: float
    first_token: float | None = None


class EngineClient:
    """Loads the model at startup and serves generation, scoring and adapter work from the
    engine thread; everything the server asks of the engine goes through these methods."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        adapter_loader: Callable[[str], Adapter] | None = None,
    ) -> None:
        self._settings, self._metrics = settings, metrics
        self._adapter_loader = adapter_loader
        self._loaded: LoadedModel | None = None
        self._engine: Engine | None = None
        self._slots: AdapterSlots | None = None
        self._model: ModelInfo | None = None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._draining = False  # shutting down: no new requests
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._load_done = threading.Event()
        self._load_error: Exception | None = None
        self._started_at = int(time.time())
        self._blas: BlasReport | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the model is loaded and requests can be served (False again on shutdown)."""
        return self._engine is not None and not self._stopping and not self._draining

    @property
    def draining(self) -> bool:
        """True once shutdown has begun: new requests are refused, open ones finish."""
        return self._draining

    @property
    def load_error(self) -> Exception | None:
        """Why the model failed to load; None while loading or once loaded."""
        return self._load_error

    async def start(self) -> None:
        """Load the model and start the engine thread in the background: /health answers at
        once, /ready and completions wait for `ready`. `wait_ready()` waits for it."""
        self._started_at = int(time.time())
        self._thread = threading.Thread(
            target=self._load_and_run, name="loraforge-engine", daemon=True
        )
        self._thread.start()
        metrics = self._metrics
        metrics.running_requests.set_function(
            lambda: self._engine.num_running if self._engine else 0
        )
        metrics.waiting_requests.set_function(self._waiting)

    def _load_and_run(self) -> None:
        try:
            self._load()
        except Exception as e:
            self._load_error = e
            log.error("cannot load the model: %s", e)
            self._load_done.set()
            return
        self._load_done.set()
        self._run()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the model is loaded; raise its load error if loading failed."""
        await anyio.to_thread.run_sync(self._load_done.wait, timeout)
        if self._load_error is not None:
            raise self._load_error

    def _load(self) -> None:
        s = self._settings
        path = resolve_model_path(s.model)
        loaded = load_model(path)
        if self._adapter_loader is not None:
            self._slots = AdapterSlots(
                loaded.model, s.max_loaded_adapters, s.max_lora_rank, self._adapter_loader
            )
        kv_tokens = None
        if s.kv_cache_memory_gb:
            kv_tokens = loaded.kv_tokens_in(int(s.kv_cache_memory_gb * 1e9))
        prefix_tokens = 0
        if s.prefix_cache_mb:
            prefix_tokens = max(
                _PREFIX_BLOCK_TOKENS, loaded.kv_tokens_in(int(s.prefix_cache_mb * 2**20))
            )
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            max_num_seqs=s.max_num_seqs,
            max_model_len=s.max_model_len,
            kv_budget_tokens=kv_tokens,
            prefix_cache_tokens=prefix_tokens,
            adapter_slots=self._slots,
        )
        # Measured here: MLX work belongs on the engine thread. Logged with the fix when slow.
        self._blas = report_blas(log.info, log.warning)
        self._loaded = loaded
        self._model = ModelInfo(self.model_id, loaded.args, engine.max_model_len)
        self._engine = engine  # last: `ready` turns True with everything above in place
        log.info(
            "serving %s from %s (%s, max context %d)",
            self.model_id,
            path,
            loaded.source_format,
            engine.max_model_len,
        )

    @property
    def blas(self) -> BlasReport | None:
        """What fp32 matmuls run on, measured once the model loaded (None before)."""
        return self._blas

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._thread.join, 30)

    def begin_shutdown(self, grace_s: float) -> None:
        """Stop admitting requests (they get 503 with Retry-After) and give the open ones
        `grace_s` seconds to finish; then each still open ends with a shutdown error (streams:
        an error event and [DONE]). Call on the event loop when the server starts shutting down."""
        self._draining = True
        log.info(
            "shutting down: %d requests in flight get %.0f s to finish", len(self._streams), grace_s
        )
        asyncio.get_running_loop().call_later(grace_s, self._end_open_requests)

    def _end_open_requests(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        if streams:
            log.warning(
                "ending %d requests still open after the shutdown grace period", len(streams)
            )
        error = ServiceUnavailableError(
            "the server shut down before this answer was finished: retry the request",
            retry_after_s=5,
            code="server_shutdown",
        )
        for q in {id(s.queue): s.queue for s in streams}.values():
            q.put_nowait(error)  # _outputs raises it and aborts the rows

    def _waiting(self) -> float:
        with self._lock:
            n = len(self._streams)
        return max(0, n - (self._engine.num_running if self._engine else 0))

    # -- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self._engine
        assert engine is not None  # _load set it before the loop starts
        while not (self._stopping and not self._streams):
            if not engine.has_work():
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outs = engine.step()
            except Exception as e:  # a bug must not take the service down: fail what was running
                log.exception("engine step failed; failing the running requests, keeping the queue")
                outs = engine.fail_in_flight(e)
            for out in outs:
                if out.error is not None and not isinstance(out.error, LoraforgeError):
                    log.error("request %s failed in the engine: %r", out.request_id, out.error)
            self._deliver(outs)

    def _deliver(self, outs: Sequence[GenerationOutput]) -> None:
        # One wake-up of each event loop per step, not one per row: each call_soon_threadsafe
        # writes to the loop's self-pipe, and at 32 rows those writes were a tenth of the engine
        # thread's time (py-spy, benchmarks/NOTES.md section 7).
        now = time.perf_counter()
        with self._lock:
            found = [(self._streams.get(out.request_id), out) for out in outs]
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, GenerationOutput]]] = {}
        tokens = 0
        for stream, out in found:
            if stream is None:
                continue
            if stream.first_token is None and out.tokens:
                stream.first_token = now
                self._metrics.time_to_first_token.observe(now - stream.submitted)
            tokens += len(out.tokens)
            batches.setdefault(stream.loop, []).append((stream.queue, out))
        if tokens:
            self._metrics.generation_tokens.inc(tokens, model=self.model_id)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    async def _run_on_engine(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread between two steps and wait for its result."""
        engine = self._require_engine()
        fut = engine.call(fn)
        self._wake.set()
        return await asyncio.wrap_future(fut)

    def _require_engine(self) -> Engine:
        self.require_ready()
        assert self._engine is not None  # require_ready raised otherwise
        return self._engine

    # -- the model ---------------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """The id the base model is served as, known before it loads."""
        return self._settings.base_model_id()

    @property
    def started_at(self) -> int:
        """Unix time the server started (the base model's `created` in /v1/models)."""
        return self._started_at

    @property
    def model(self) -> ModelInfo | None:
        """The served model's id, shapes and context limit; None until it is loaded."""
        return self._model

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (encode, decode, chat template); the 503 of `require_ready()`
        until the model is loaded."""
        if self._loaded is None:
            self.require_ready()
        assert self._loaded is not None  # require_ready raised otherwise
        return self._loaded.tokenizer

    def require_ready(self) -> ModelInfo:
        """The served model; raises the 503 that explains why requests cannot be served yet (or
        at all)."""
        if self.load_error is not None:
            raise ServiceUnavailableError(
                f"the model failed to load ({self.load_error}): restart the "
                "server with a working --model",
                code="model_load_failed",
            )
        model = self.model
        if self.draining:
            raise ServiceUnavailableError(
                "the server is shutting down: retry shortly (another replica, or this one once "
                "it is back)",
                retry_after_s=5,
                code="server_shutdown",
            )
        if not self.ready or model is None:
            raise ServiceUnavailableError(
                "the model is not loaded yet (or the server is shutting down): retry shortly",
                retry_after_s=5,
                code="model_loading",
            )
        return model

    # -- generation --------------------------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns():x}"

    def generate(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """Submit requests together (errors raise here, before any response is started) and
        return an async iterator of (index in `requests`, output) until all finish. Closing the
        iterator early aborts what is still running."""
        engine = self._require_engine()
        s = self._settings
        try:  # each request checked once, all before any is queued
            prepared = [engine.prepare(r) for r in requests]
        except EngineError as e:
            raise _api_error(e) from e
        capacity = s.max_num_seqs + s.max_queue
        if len(requests) > capacity:
            raise BadRequestError(
                f"this request asks for {len(requests)} sequences (n x prompts), more than this server "
                f"holds at once ({s.max_num_seqs} running + {s.max_queue} queued): lower n or send "
                "fewer prompts per request",
                param="n",
            )
        budget = engine.kv_budget_tokens
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
        self._metrics.prompt_tokens.inc(sum(len(r.prompt) for r in requests), model=self.model_id)
        for p in prepared:
            engine.submit(p)
        self._wake.set()
        return self._outputs(engine, requests, queue)

    async def _outputs(
        self, engine: Engine, requests: Sequence[GenerationRequest], queue: asyncio.Queue
    ) -> AsyncIterator[tuple[int, GenerationOutput]]:
        index = {r.request_id: i for i, r in enumerate(requests)}
        pending = set(index)
        try:
            while pending:
                out = await queue.get()
                if isinstance(out, APIError):
                    raise out
                if out.finish_reason:
                    pending.discard(out.request_id)
                yield index[out.request_id], out
                if out.error is not None:  # after its output: a stream closes the choice first
                    raise row_error(out.error) from out.error
        finally:
            for rid in pending:  # the client left early: free the slots now
                engine.abort(rid)
            self._wake.set()
            with self._lock:
                for r in requests:
                    self._streams.pop(r.request_id, None)

    def abort(self, request_id: str) -> None:
        """End a request at the next step (its stream gets finish_reason "abort")."""
        if self._engine is not None:
            self._engine.abort(request_id)
            self._wake.set()

    async def score_prompt(
        self, tokens: list[int], top: int, adapter: str | None = None
    ) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the ones before it (None for the first) and its
        `top` alternatives, under `adapter` (an id resident-able in the slots) or the base."""
        engine = self._require_engine()
        if len(tokens) > engine.max_model_len:  # scored in one forward: refuse it before that
            raise BadRequestError(
                f"This model's maximum context length is {engine.max_model_len} tokens; the "
                f"prompt to score has {len(tokens)}. Please reduce the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        try:
            return await self._run_on_engine(lambda: engine.score_prompt(tokens, top, adapter))
        except EngineError as e:
            raise _api_error(e) from e

    # -- adapters ----------------------------------------------------------------------------------
    async def run_mlx(self, fn: Callable[[], T]) -> T:
        """Run MLX work (reading, checking, writing adapter weights) on the engine thread, where
        all the model's other MLX work runs, and wait for its result."""
        return await self._run_on_engine(fn)

    async def unload_adapter(self, adapter_id: str) -> None:
        """Drop the adapter from its slot and its prompts from the prefix cache; requests in
        flight keep the resident copy until they finish. Nothing to do before the model loads."""
        slots, engine = self._slots, self._engine
        if slots is None or engine is None:
            return

        def unload() -> None:
            slots.unload(adapter_id)
            engine.prefix_cache.clear(adapter_id)

        await self._run_on_engine(unload)

    def is_resident(self, adapter_id: str) -> bool:
        """True while the adapter's weights sit in one of the engine's slots."""
        return adapter_id in self.resident_adapters()

    def resident_adapters(self) -> list[str]:
        """Ids of the adapters loaded in the engine's slots."""
        return self._slots.resident() if self._slots is not None else []


def row_error(e: Exception) -> APIError:
    """The HTTP error for a request whose row the engine ended with `e`: 4xx for what the request
    asked (a deleted adapter, a bad setting), 500 for an engine fault (never 503: retrying the
    same request elsewhere is no cure, and for a fault of the request it would only repeat)."""
    if isinstance(e, EngineError):
        return _api_error(e)
    if isinstance(e, LoraforgeError):
        return BadRequestError(str(e))
    return ServerError(
        "the engine failed while generating this answer; other requests go on. Retry it once, "
        "and report it if it fails again",
        code="engine_error",
    )


def _api_error(e: EngineError) -> APIError:
    """The HTTP error for a request the engine refused, chosen by its kind (not its message)."""
    if e.kind == "not_found":
        return NotFoundError(str(e), param=e.param or "model", code="model_not_found")
    if e.kind == "busy":
        return RateLimitError(str(e), retry_after_s=1)
    if e.kind == "context_length":
        return BadRequestError(
            str(e), param=e.param or "max_tokens", code="context_length_exceeded"
        )
    return BadRequestError(str(e), param=e.param)


def _put_all(items: list[tuple[asyncio.Queue, GenerationOutput]]) -> None:
    """Hand a step's outputs to their streams' queues (on the streams' event loop)."""
    for queue, out in items:
        queue.put_nowait(out)
