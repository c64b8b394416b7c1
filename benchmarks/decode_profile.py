"""Where a batch-1 token's time goes: host (building the step in Python, encoding it) against the
GPU, for our model (with and without the 4-bit kernel) and mlx-lm's, on the same weights in one
process. Also a cold 512-token prefill of each. Prints JSON.

    python -m benchmarks.decode_profile --model /root/random-7b-bf16-q4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from benchmarks.common import report
from benchmarks.generate import prompt_ids


def ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 3)


def profile(step, prime, n: int) -> dict:
    """`prime()` resets the cache and prefills; `step(y)` builds one decode step's token."""
    y = prime()
    build, encode, wait = [], [], []
    for _ in range(n):  # synchronous: the three parts of one step, one at a time
        t0 = time.perf_counter()
        out = step(y)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        out.item()
        t3 = time.perf_counter()
        build.append(t1 - t0)
        encode.append(t2 - t1)
        wait.append(t3 - t2)
        y = out
    y = prime()
    nxt = step(y)
    mx.async_eval(nxt)
    start = time.perf_counter()
    for _ in range(n):  # pipelined, as a generation loop runs
        after = step(nxt)
        mx.async_eval(after)
        nxt.item()
        nxt = after
    nxt.item()
    per_token = (time.perf_counter() - start) / n
    return {
        "build_ms": ms(build),
        "encode_ms": ms(encode),
        "wait_ms": ms(wait),
        "sync_step_ms": ms([a + b + c for a, b, c in zip(build, encode, wait)]),
        "pipelined_ms": round(per_token * 1e3, 3),
        "pipelined_tps": round(1 / per_token, 1),
    }


def prefill_ms(run, reps: int = 5) -> float:
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return ms(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", type=int, default=128, help="decode steps timed per variant")
    p.add_argument("--prompt-tokens", type=int, default=512)
    ns = p.parse_args()

    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as load_mlx_lm

    from mlx_core.kernels import FastQuantizedLinear, use_fast_kernels
    from mlx_core.weights import load_model

    ours = load_model(ns.model).model
    theirs, _ = load_mlx_lm(Path(ns.model))
    quantized = ours.args.quantization is not None
    prompt = mx.array([prompt_ids(ns.prompt_tokens, ours.args.vocab_size)])
    results: dict = {}
    state: dict = {}

    def prime_ours():
        state["cache"] = ours.new_cache(1)
        logits = ours(prompt, cache=state["cache"], last_only=True)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y, state["cache"].keys, state["cache"].values)
        return y

    def prime_theirs():
        state["pc"] = make_prompt_cache(theirs)
        logits = theirs(prompt, cache=state["pc"])
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y, [c.state for c in state["pc"]])
        return y

    def cold_ours():
        cache = ours.new_cache(1)
        mx.eval(ours(prompt, cache=cache, last_only=True), cache.keys, cache.values)

    def cold_theirs():
        pc = make_prompt_cache(theirs)
        mx.eval(theirs(prompt, cache=pc), [c.state for c in pc])

    results["prefill_ms"] = {"loraforge": prefill_ms(cold_ours), "mlx_lm": prefill_ms(cold_theirs)}
    results["prefill_tps"] = {
        k: round(ns.prompt_tokens / v * 1e3) for k, v in results["prefill_ms"].items()
    }

    def eager(y):
        return mx.argmax(ours(y.reshape(1, 1), cache=state["cache"])[:, -1, :], axis=-1)

    def mlx_lm_step(y):
        return mx.argmax(theirs(y.reshape(1, 1), cache=state["pc"])[:, -1, :], axis=-1)

    kernels = [False, True] if quantized else [False]
    for fast in kernels:
        for m in (mm for _, mm in ours.named_modules()):
            if fast and type(m) is nn.QuantizedLinear:
                m.__class__ = FastQuantizedLinear
            elif not fast and type(m) is FastQuantizedLinear:
                m.__class__ = nn.QuantizedLinear
        tag = "_qmv4" if fast else ""
        results[f"loraforge{tag}"] = profile(eager, prime_ours, ns.tokens)
        if fast:
            use_fast_kernels(ours)
    results["mlx_lm"] = profile(mlx_lm_step, prime_theirs, ns.tokens)

    if quantized:  # host cost of putting one product in the graph (no evaluation)
        lin = ours.model.layers[0].mlp.gate_up_proj
        x = mx.random.normal((1, 1, ours.args.dim)).astype(mx.bfloat16)
        mx.eval(x)
        for label, cls in (("qmv4", FastQuantizedLinear), ("quantized_matmul", nn.QuantizedLinear)):
            lin.__class__ = cls
            lin(x)
            start = time.perf_counter()
            outs = [lin(x) for _ in range(1000)]
            results[f"construct_us_{label}"] = round((time.perf_counter() - start) * 1e3, 2)
            del outs
        lin.__class__ = FastQuantizedLinear
    report(
        "decode_profile", {"model": ns.model, "quantized": quantized, "tokens": ns.tokens}, results
    )


if __name__ == "__main__":
    main()
