"""Prefill shapes seen for the first time: does a new (rows, query length, key length) cost more
than its compute?

    python -m benchmarks.prefill_shapes --random 7b [--tokenizer tokenizer.model]

Serving makes a new prefill shape almost every step (a group's rows, its longest prompt or
remainder, the cached length before it); decode makes the same few. Each case below is one
forward of `q` tokens on each of `rows` rows, on top of a cache already holding `cached` aligned
tokens (left-padded rows where `padded`, as the engine's groups are), timed the first time this
process sees that shape and again (median of 3, each on a fresh cache in the same state). mlx-lm's
model is timed the same way on one row of a new prompt length, its own prefill path: the
reference for the first-sight cost. `first_extra_ms` = first - again; tens of milliseconds there
is per-shape setup (kernel builds, attention plans), not compute. Then the engine end to end:
the time to every row's first token when 8 or 32 prompts arrive at once, new ones against the
same ones again (prefix-cache hits). Prints JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import mlx.core as mx

from benchmarks.common import add_model_arguments, prepare_model, report

T = TypeVar("T")

# (rows, cached, q, padded): each shape distinct, so every case's first run is a first sight.
CASES = [
    (1, 0, 100, False),  # one new prompt
    (1, 96, 16, False),  # one prefix hit: 16 tokens after 96 cached
    (32, 0, 100, True),  # a group of new prompts
    (32, 96, 16, True),  # a group of prefix hits (benchmarks.serve's repeated prompts)
    (32, 112, 9, True),  # the same group a round later: other remainders
    (8, 80, 24, True),
    (32, 0, 104, True),  # a group of new prompts, 4 tokens longer
]


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def first_and_again(prepare: Callable[[], T], run: Callable[[T], None]) -> tuple[dict, float]:
    """`run` timed 4 times, each on a fresh `prepare()` (untimed): the figures of the first time,
    the median of the other three and what the first cost beyond them; and that median in s."""
    times = []
    for _ in range(4):
        state = prepare()
        start = time.perf_counter()
        run(state)
        times.append(time.perf_counter() - start)
    again = statistics.median(times[1:])
    figures = {
        "first_ms": ms(times[0]),
        "again_ms": ms(again),
        "first_extra_ms": ms(times[0] - again),
    }
    return figures, again


def ours_case(model, rows: int, cached: int, q: int, padded: bool) -> dict:
    vocab = model.args.vocab_size
    # Shorter rows are left-padded: up to 3 columns, inside the part before the timed forward
    # (or inside the prompt when nothing is cached).
    pad = [(i % 4) if padded else 0 for i in range(rows)]

    def fresh_cache():
        cache = model.new_cache(rows, pad)
        if cached:
            x = mx.random.randint(3, vocab, (rows, cached)).astype(mx.int32)
            mx.eval(model(x, cache=cache, last_only=True), cache.keys, cache.values)
        return cache

    x = mx.random.randint(3, vocab, (rows, q)).astype(mx.int32)
    mx.eval(x)
    timed, again = first_and_again(
        fresh_cache,
        lambda cache: mx.eval(model(x, cache=cache, last_only=True), cache.keys, cache.values),
    )
    return {
        "rows": rows,
        "cached": cached,
        "q": q,
        "padded": padded,
        **timed,
        "tokens_per_s_again": round(rows * q / again),
    }


def engine_first_tokens(model, tokenizer, rows: int, length: int, rounds: int = 3) -> dict:
    """Seconds from submitting `rows` prompts at once to the last row's first token, in an
    Engine with the server's prefix cache: each round's prompts new (computed from nothing),
    then the same prompts again (every row a prefix hit: the path `benchmarks.serve` takes
    after its warm-up)."""
    from mlx_core.engine import Engine, GenerationRequest
    from mlx_core.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_num_seqs=rows, prefix_cache_tokens=rows * length * 4)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    vocab = model.args.vocab_size

    def first_tokens(prompts: list[list[int]], tag: str) -> float:
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(GenerationRequest(f"{tag}-{i}", prompt, params))
        waiting = {f"{tag}-{i}" for i in range(len(prompts))}
        while waiting:
            for out in engine.step():
                if out.tokens:
                    waiting.discard(out.request_id)
        took = time.perf_counter() - start
        while engine.has_work():
            engine.step()
        return took

    cold, hit = [], []
    for k in range(rounds + 1):  # round 0 warms up both paths
        prompts = [mx.random.randint(3, vocab, (length + (i % 5),)).tolist() for i in range(rows)]
        c, h = first_tokens(prompts, f"c{k}"), first_tokens(prompts, f"h{k}")
        if k:
            cold.append(ms(c))
            hit.append(ms(h))
    return {"rows": rows, "prompt_tokens": length, "cold_ms": cold, "prefix_hit_ms": hit}


def mlx_lm_case(model, length: int, vocab: int) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    x = mx.random.randint(3, vocab, (1, length)).astype(mx.int32)
    mx.eval(x)
    timed, _ = first_and_again(
        lambda: make_prompt_cache(model),
        lambda pc: mx.eval(model(x, cache=pc), [c.state for c in pc]),
    )
    return {"rows": 1, "q": length, **timed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--skip-mlx-lm", action="store_true")
    ns = p.parse_args()
    path, tmp = prepare_model(ns)

    from mlx_core.kernels import use_fast_kernels
    from mlx_core.weights import load_model

    loaded = load_model(path)
    ours = loaded.model
    use_fast_kernels(ours)
    # Warm-up on a shape no case uses: one-time initialisation is not a shape's cost.
    mx.eval(ours(mx.array([[5] * 7]), cache=ours.new_cache(1), last_only=True))
    results: dict = {"loraforge": [ours_case(ours, *case) for case in CASES]}
    results["loraforge_engine_first_tokens"] = [
        engine_first_tokens(ours, loaded.tokenizer, rows, 100) for rows in (8, 32)
    ]
    if not ns.skip_mlx_lm:
        from pathlib import Path

        from mlx_lm.utils import load_model as load_mlx_lm

        theirs, _ = load_mlx_lm(Path(path))
        mx.eval(theirs(mx.array([[5] * 7])))
        results["mlx_lm"] = [
            mlx_lm_case(theirs, length, ours.args.vocab_size) for length in (100, 16, 104, 9)
        ]
    report("prefill_shapes", {"model": str(path) if ns.model else f"random {ns.random}"}, results)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
