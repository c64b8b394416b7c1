"""Serving throughput: N concurrent streaming clients against `loraforge serve` and
`mlx_lm.server` on the same weights, in one run.

    python -m benchmarks.serve --random 7b --clients 1 8 32 [--adapters 8]

Each client sends one streaming completion (a ~100-token prompt of its own, 128 new tokens,
greedy). Prints JSON per server and client count: aggregate generated tokens/s, median and p99
time to first token. With --adapters K, loraforge is also measured with K distinct LoRA adapters
in the mix (client i uses adapter i % K) against its single-model figure. --engine-alone first
hands the same clients to an in-process Engine (no HTTP), which splits the server's TTFT and
tok/s into the engine's part and the HTTP layer's (`server_ttft_mean_s`, from loraforge's
/metrics, splits it once more: the time from the request reaching the engine client to its first
token); --repeats N reports the median of N rounds. Every round sends the same prompts, so after
the warm-up each is a prefix-cache hit (a client resending its header); --fresh-prompts gives
each round new ones, every prompt then computed from nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.common import add_model_arguments, free_memory, prepare_model, report

WORDS = (
    "table player team score season goals coach city stadium year round match points "
    "club league record home away final result date position nationality school"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Q{i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


@dataclass(frozen=True)
class Prompts:
    """The prompts of each round: the same every round (after the warm-up every prompt is a
    prefix-cache hit, like clients resending a shared header), or with `fresh` new ones each
    round (every prompt computed from nothing). Round k is the same list for every server."""

    n: int
    words: int
    fresh: bool = False

    def round(self, k: int) -> list[str]:
        return prompts(self.n, self.words, seed=k if self.fresh else 0)


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    extra: dict,
    delay: float,
) -> tuple[float, int, float] | None:
    await asyncio.sleep(delay)
    for attempt in range(3):
        try:
            return await _stream(client, url, model, prompt, max_tokens, extra)
        except httpx.TransportError:  # a server with a short accept backlog resets bursts
            await asyncio.sleep(0.2 * (attempt + 1))
    return None


async def _stream(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, extra: dict
) -> tuple[float, int, float]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        **extra,
    }
    start = time.perf_counter()
    first, chunks = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, chunks, end - start


async def load(
    url: str, models: list[str], texts: list[str], clients: int, max_tokens: int, extra: dict
) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        # Clients arrive 2 ms apart (the same for every server): a burst of simultaneous connects
        # overflows the accept backlog of Python's http.server (mlx_lm.server).
        done = await asyncio.gather(
            *[
                one_request(
                    client, url, models[i % len(models)], texts[i], max_tokens, extra, 0.002 * i
                )
                for i in range(clients)
            ]
        )
        wall = time.perf_counter() - start
    results = [r for r in done if r is not None]
    if not results:
        return {"clients": clients, "failed": clients}
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "generated_tokens": tokens,
        "aggregate_tps": round(tokens / wall, 1),
        "per_client_tps": round(
            statistics.median(r[1] / max(r[2] - r[0], 1e-9) for r in results), 1
        ),
        **ttft_figures(ttft),
        "wall_s": round(wall, 2),
        "failed": clients - len(results),
    }


def ttft_figures(ttft: list[float]) -> dict[str, float]:
    """Median and p99 of sorted times to first token."""
    return {
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3),
    }


def median_round(rounds: list[dict]) -> dict:
    """The round with the median aggregate tok/s, every round's figure beside it (one round:
    that round as it is)."""
    if len(rounds) == 1:
        return rounds[0]
    rounds = sorted(rounds, key=lambda r: r.get("aggregate_tps", 0.0))
    return {
        **rounds[len(rounds) // 2],
        "aggregate_tps_rounds": [r.get("aggregate_tps") for r in rounds],
    }


def measure(
    url: str,
    models: list[str],
    texts: Prompts,
    clients: int,
    max_tokens: int,
    extra: dict,
    repeats: int = 1,
    server_ttft: bool = False,
) -> dict:
    """One warm-up round at this concurrency (first-time kernel compilation for new batch shapes
    is not what we measure), then `repeats` measured rounds; the same for every server. The
    round with the median aggregate tok/s is reported, with every round's figure beside it.
    `server_ttft`: also the server's own mean time to first token over each round (loraforge's
    /metrics, from the request reaching the engine client to its first token leaving the
    engine), so that the client's TTFT splits into the server's part and HTTP's."""
    asyncio.run(load(url, models, texts.round(0), clients, 16, extra))
    rounds = []
    for k in range(1, repeats + 1):
        before = server_ttft_totals(url) if server_ttft else None
        row = asyncio.run(load(url, models, texts.round(k), clients, max_tokens, extra))
        if before is not None:
            after = server_ttft_totals(url)
            if after[1] > before[1]:
                row["server_ttft_mean_s"] = round(
                    (after[0] - before[0]) / (after[1] - before[1]), 3
                )
        rounds.append(row)
    return median_round(rounds)


def server_ttft_totals(url: str) -> tuple[float, int]:
    """(sum, count) of loraforge's time-to-first-token histogram, all models together."""
    total, count = 0.0, 0
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("loraforge_time_to_first_token_seconds_sum"):
            total += float(value)
        elif name.startswith("loraforge_time_to_first_token_seconds_count"):
            count += int(float(value))
    return total, count


def engine_alone(path: Path, texts: Prompts, client_counts: list[int], ns) -> list[dict]:
    """The same clients (prompts, arriving 2 ms apart, greedy, ignore_eos, a warm-up round
    first) handed straight to an in-process `Engine` with the server's prefix cache, no HTTP:
    the part of the server's TTFT and tok/s that is the engine's own. (mlx-lm has no engine to
    compare here; its server is measured below.)"""
    import threading

    from mlx_core.engine import Engine, GenerationRequest
    from mlx_core.sampling import SamplingParams
    from mlx_core.weights import load_model

    loaded = load_model(path)
    tok = loaded.tokenizer
    engine = Engine(
        loaded.model,
        tok,
        max_num_seqs=max(32, max(client_counts)),
        prefix_cache_tokens=loaded.kv_tokens_in(512 * 2**20),  # the server's --prefix-cache-mb
    )
    rounds_run = 0

    def one_round(clients: int, max_tokens: int, k: int) -> dict:
        nonlocal rounds_run
        rounds_run += 1
        ids = [tok.encode(t) for t in texts.round(k)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        sent: dict[str, float] = {}
        first: dict[str, float] = {}

        def arrive() -> None:
            for i in range(clients):
                rid = f"{rounds_run}-{i}"
                sent[rid] = time.perf_counter()
                engine.add_request(GenerationRequest(rid, ids[i], params))
                time.sleep(0.002)

        feeder = threading.Thread(target=arrive)
        start = time.perf_counter()
        feeder.start()
        tokens = 0
        while feeder.is_alive() or engine.has_work():
            for out in engine.step():
                tokens += len(out.tokens)
                if out.tokens and out.request_id not in first:
                    first[out.request_id] = time.perf_counter()
        wall = time.perf_counter() - start
        ttft = sorted(first[r] - sent[r] for r in first)
        return {
            "clients": clients,
            "generated_tokens": tokens,
            "aggregate_tps": round(tokens / wall, 1),
            **ttft_figures(ttft),
            "wall_s": round(wall, 2),
        }

    rows = []
    for clients in client_counts:
        one_round(clients, 16, 0)
        rows.append(
            median_round([one_round(clients, ns.max_tokens, k) for k in range(1, ns.repeats + 1)])
        )
    return rows


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def make_adapters(model_path: Path, data_dir: Path, k: int) -> list[str]:
    import mlx.core as mx

    from mlx_core.config import load_config
    from mlx_core.lora.formats import save_adapter
    from mlx_core.lora.layers import Adapter, projection_parts

    args = load_config(model_path)
    parts = projection_parts(args)
    names = []
    for a in range(k):
        weights = {}
        for layer in range(args.n_layers - min(16, args.n_layers), args.n_layers):
            for t in ("q_proj", "v_proj"):
                p = parts[t]
                weights[(layer, t)] = (
                    mx.random.normal((p.in_dims, 8)) * 0.01,
                    mx.random.normal((8, p.end - p.start)) * 0.01,
                )
        adapter = Adapter(
            8,
            2.0,
            ("q_proj", "v_proj"),
            tuple(sorted({layer for layer, _ in weights})),
            weights,
            fingerprint=args.shape_fingerprint(),
        )
        save_adapter(data_dir / "incoming" / f"bench-{a}", adapter)
        names.append(f"bench-{a}")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=70, help="~100 tokens")
    p.add_argument("--adapters", type=int, default=0)
    p.add_argument("--skip-mlx-lm", action="store_true")
    p.add_argument(
        "--engine-alone",
        action="store_true",
        help="also run the clients against an in-process Engine (no HTTP) first",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measured rounds per client count (the median one is reported; on a noisy host, 3)",
    )
    p.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="new prompts every round (none is a prefix-cache hit); default: the same prompts "
        "every round, so after the warm-up each is a hit",
    )
    ns = p.parse_args()
    path, tmp = prepare_model(ns)
    results: dict = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    max_clients = max(ns.clients)
    texts = Prompts(max_clients, ns.prompt_words, ns.fresh_prompts)
    if ns.engine_alone:
        results["loraforge_engine_alone"] = engine_alone(path, texts, ns.clients, ns)
        free_memory()  # its model is gone with the call; the server about to start needs the room
    with tempfile.TemporaryDirectory() as data:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(path),
            "--port",
            str(port),
            "--data-dir",
            data,
            "--no-start-worker",
            "--served-model-name",
            "bench",
            "--max-num-seqs",
            str(max(32, max_clients)),
            "--log-level",
            "warning",
        ]
        proc = subprocess.Popen(cmd, env=env)
        try:
            wait_ready(url, proc, "/ready")
            results["loraforge"] = [
                measure(
                    url, ["bench"], texts, c, ns.max_tokens, {"ignore_eos": True}, ns.repeats, True
                )
                for c in ns.clients
            ]
            if ns.adapters:
                names = make_adapters(path, Path(data), ns.adapters)
                for name in names:
                    httpx.post(
                        f"{url}/v1/adapters",
                        json={"name": name, "path": f"incoming/{name}"},
                        timeout=120,
                    ).raise_for_status()
                results[f"loraforge_{ns.adapters}_adapters"] = [
                    measure(
                        url, names, texts, c, ns.max_tokens, {"ignore_eos": True}, ns.repeats, True
                    )
                    for c in ns.clients
                    if c >= ns.adapters
                ]
        finally:
            stop(proc)
    print(json.dumps(results), file=sys.stderr)  # partial results survive a failing reference run
    if not ns.skip_mlx_lm:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlx_lm.server",
                "--model",
                str(path),
                "--port",
                str(port),
                "--log-level",
                "WARNING",
            ],
            env=env,
        )
        try:
            wait_ready(url, proc, "/health")
            results["mlx_lm"] = [
                measure(url, ["default_model"], texts, c, ns.max_tokens, {}, ns.repeats)
                for c in ns.clients
            ]
        finally:
            stop(proc)
        results["aggregate_tps_ratio"] = {
            str(a["clients"]): round(a["aggregate_tps"] / b["aggregate_tps"], 2)
            for a, b in zip(results["loraforge"], results["mlx_lm"])
            if "aggregate_tps" in b
        }
    report(
        "serve",
        {
            "model": str(path) if ns.model else f"random {ns.random}",
            "dtype": ns.dtype,
            "quantize": ns.quantize,
            "max_tokens": ns.max_tokens,
            "prompt_words": ns.prompt_words,
            "fresh_prompts": ns.fresh_prompts,
        },
        results,
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
