"""Batch-1 generation speed: loraforge's engine vs mlx-lm on the same weights, in one run.

    python -m benchmarks.generate --random 7b --dtype bf16 [--quantize 4]
    python -m benchmarks.generate --model PATH

Prints JSON: prompt tokens/s (prefill) and generation tokens/s (decode) for each, and the ratio.
Greedy, EOS ignored on both sides (random weights would stop at random). Every run has a prompt of
its own (the same list for both engines), so no run reuses the one before: our engine's prefix
cache would otherwise serve the whole prompt but its last block. The prefix-cache hit is timed
apart: `prompt_tps_first_prefix_hit` (the last prompt sent again: on CUDA this includes building
kernels and attention plans for the new shapes) and `prompt_tps_prefix_hit` (sent a third time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from benchmarks.common import Timer, add_model_arguments, free_memory, prepare_model, report


def prompt_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    mx.random.seed(seed)
    return [1] + mx.random.randint(3, vocab, (n - 1,)).tolist()


def bench_ours(path, prompts: list[list[int]], gen: int, qmv4: bool = True) -> dict:
    import mlx_core.engine
    from mlx_core.engine import Engine
    from mlx_core.sampling import SamplingParams
    from mlx_core.weights import load_model

    with Timer() as load:
        loaded = load_model(path)
    if not qmv4:  # the engine switches quantized linears to the kernel: make that a no-op
        mlx_core.engine.use_fast_kernels = lambda model: None
    engine = Engine(loaded.model, loaded.tokenizer, prefill_chunk=2048, prefill_budget=8192)
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)

    def once(engine: Engine, prompt: list[int], request_id: str) -> tuple[float, float, int]:
        start = time.perf_counter()
        first = None
        n = 0
        for out in engine.generate(prompt, params, request_id=request_id):
            if first is None and out.tokens:
                first = time.perf_counter()
            n += len(out.tokens)
        end = time.perf_counter()
        return len(prompt) / (first - start), (n - 1) / (end - first), n

    # The first run warms up; every run has its own prompt, so none is a prefix-cache hit.
    results = [once(engine, prompt, f"r{i}") for i, prompt in enumerate(prompts)][1:]
    hit = once(engine, prompts[-1], "hit")[0]  # the first hit also pays for new shapes
    hit_again = once(engine, prompts[-1], "hit2")[0]
    peak = mx.get_peak_memory() / 1e9
    del engine, loaded
    free_memory()
    summary = _summary(results, load.seconds, peak)
    summary["prompt_tps_prefix_hit"] = round(hit_again, 1)
    summary["prompt_tps_first_prefix_hit"] = round(hit, 1)
    summary["qmv4"] = qmv4
    return summary


def bench_mlx_lm(path, prompts: list[list[int]], gen: int) -> dict:
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    with Timer() as load:
        model, _ = load_model(path)

    # mlx-lm's generate_step never stops at EOS by itself: it runs to max_tokens, as ours does
    # with ignore_eos.
    results = []
    mx.reset_peak_memory()
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        first = None
        n = 0
        for _ in generate_step(
            mx.array(prompt), model, max_tokens=gen, sampler=lambda x: mx.argmax(x, axis=-1)
        ):
            n += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if i:
            results.append((len(prompt) / (first - start), (n - 1) / (end - first), n))
    peak = mx.get_peak_memory() / 1e9
    del model
    free_memory()
    return _summary(results, load.seconds, peak)


def _summary(results, load_s: float, peak_gb: float) -> dict:
    return {
        "prompt_tps": round(statistics.median(r[0] for r in results), 1),
        "generation_tps": round(statistics.median(r[1] for r in results), 1),
        "generated_tokens": results[0][2],
        "load_seconds": round(load_s, 2),
        "peak_memory_gb": round(peak_gb, 2),
        "runs": len(results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-mlx-lm", action="store_true")
    p.add_argument(
        "--no-qmv4", action="store_true", help="ours without the 4-bit kernel (mlx_core/kernels.py)"
    )
    ns = p.parse_args()
    path, tmp = prepare_model(ns)
    from mlx_core.config import load_config

    vocab = load_config(path).vocab_size
    prompts = [prompt_ids(ns.prompt_tokens, vocab, seed=1 + i) for i in range(ns.runs + 1)]
    mx.reset_peak_memory()
    results = {"loraforge": bench_ours(path, prompts, ns.gen_tokens, not ns.no_qmv4)}
    if not ns.skip_mlx_lm:
        mx.reset_peak_memory()
        results["mlx_lm"] = bench_mlx_lm(path, prompts, ns.gen_tokens)
        for key in ("prompt_tps", "generation_tps"):
            results[f"{key}_ratio"] = round(results["loraforge"][key] / results["mlx_lm"][key], 3)
    report(
        "generate",
        {
            "model": str(path) if ns.model else f"random {ns.random}",
            "dtype": ns.dtype,
            "quantize": ns.quantize,
            "prompt_tokens": ns.prompt_tokens,
            "gen_tokens": ns.gen_tokens,
            "batch": 1,
        },
        results,
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
