"""What a structured-output constraint costs: tokens/s with and without each kind, in one run.

    python -m benchmarks.structured --random tiny --dtype f32       # this CPU, ~1 minute
    python -m benchmarks.structured --random 7b --dtype bf16        # the H200 (7B shapes)

Prints JSON. For 1, 8 and 32 concurrent requests in one running batch: generated tokens/s with no
constraint and with a JSON schema, a regex, a choice and a Lark grammar, and each one's ratio to
the unconstrained run. Every row samples at temperature 0.8 for exactly --gen-tokens tokens (EOS
ignored; each constraint is built so it cannot be finished sooner), so the counts compare. Also
the compile time of each constraint (grammar text -> llguidance grammar, then the first matcher
built against the vocabulary, then its first mask, when llguidance builds the lexer), and the
vocabulary's build time. Each constrained cell also has `per_step_ms`: the engine thread's
time per constrained step, and within it the wait for the previous tokens (the device), advancing
the matchers and the wait for the mask thread, beside the masks' own compute time. mlx-lm has no
structured outputs (its server neither rejects nor applies a constraint), so there is no mlx-lm
column.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import mlx.core as mx

from benchmarks.common import add_model_arguments, prepare_model, report
from mlx_core.structured.constraints import ConstraintKind

CONCURRENCY = (1, 8, 32)
# Each long enough that no row can finish inside --gen-tokens (64): every row runs to the limit.
SPECS: dict[str, tuple[ConstraintKind, Any]] = {
    "json_schema": (
        "json",
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "tags": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "minItems": 60,
                },
            },
            "required": ["id", "tags"],
            "additionalProperties": False,
        },
    ),
    "regex": ("regex", r"([a-z]{1,8} ){200}"),
    "choice": (
        "choice",
        [" ".join(f"{w}{i}" for i in range(120)) for w in ("red", "green", "blu")],
    ),
    "grammar": (
        "grammar",
        'start: item ("," item)~200..300\nitem: NUMBER | "(" NUMBER "+" NUMBER ")"\n'
        "NUMBER: /[0-9]{1,4}/\n",
    ),
}


def run_batch(engine, prompt, params, constraint, n: int) -> tuple[float, int]:
    """Seconds and generated tokens for n concurrent requests, from submit to the last token."""
    from mlx_core.engine import GenerationRequest

    start = time.perf_counter()
    for i in range(n):
        engine.add_request(GenerationRequest(f"r{i}", prompt, params, constraint=constraint))
    tokens = 0
    while engine.has_work():
        for out in engine.step():
            tokens += len(out.tokens)
    return time.perf_counter() - start, tokens


def per_step_ms(times) -> dict[str, float]:
    """A run's ConstrainedStepTimes as milliseconds per constrained step."""
    steps = max(times.steps, 1)
    return {
        "step": times.step_s / steps * 1e3,
        "forward": times.forward_s / steps * 1e3,
        "read_tokens": times.read_s / steps * 1e3,
        "advance": times.advance_s / steps * 1e3,
        "wait_for_masks": times.wait_s / steps * 1e3,
        "masks": times.mask_s / steps * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2, help="timed runs per cell (median)")
    ns = p.parse_args()
    path, tmp = prepare_model(ns)

    from mlx_core.engine import ConstrainedStepTimes, Engine
    from mlx_core.sampling import SamplingParams
    from mlx_core.structured import Constraint, RowMatcher, compile_grammar, vocabulary
    from mlx_core.structured.vocab import build_vocabulary
    from mlx_core.weights import load_model

    loaded = load_model(path)
    tok = loaded.tokenizer
    t0 = time.perf_counter()
    build_vocabulary(tok)
    vocab_s = time.perf_counter() - t0
    vocab = vocabulary(tok)
    compile_ms: dict[str, dict[str, float]] = {}
    for name, (kind, value) in SPECS.items():
        t0 = time.perf_counter()
        grammar = compile_grammar(Constraint(kind, value))
        t1 = time.perf_counter()
        matcher = RowMatcher(grammar, vocab, kind)
        t2 = time.perf_counter()
        matcher.allowed_mask()  # llguidance builds the lexer lazily, at the first mask
        t3 = time.perf_counter()
        compile_ms[name] = {
            "compile_ms": (t1 - t0) * 1e3,
            "first_matcher_ms": (t2 - t1) * 1e3,
            "first_mask_ms": (t3 - t2) * 1e3,
        }

    engine = Engine(loaded.model, tok, max_num_seqs=max(CONCURRENCY), prefix_cache_tokens=0)
    prompt = tok.encode("Write the record for the next customer as JSON:")
    params = SamplingParams(max_tokens=ns.gen_tokens, temperature=0.8, ignore_eos=True)
    kinds: dict[str, Constraint | None] = {"none": None}
    kinds.update({k: Constraint(kind, value) for k, (kind, value) in SPECS.items()})
    for constraint in kinds.values():  # warm-up: kernels compiled, matchers cached
        run_batch(engine, prompt, params, constraint, 8)
    results: dict[str, object] = {}
    for n in CONCURRENCY:
        # Kinds take turns within each round, so a noisy neighbour on the host hits all alike.
        tps: dict[str, list[float]] = {name: [] for name in kinds}
        step_ms: dict[str, list[dict[str, float]]] = {name: [] for name in SPECS}
        for _ in range(ns.runs):
            for name, constraint in kinds.items():
                engine.constrained_times = ConstrainedStepTimes()
                seconds, tokens = run_batch(engine, prompt, params, constraint, n)
                assert tokens == n * ns.gen_tokens, (name, tokens)
                tps[name].append(tokens / seconds)
                if name in step_ms:
                    step_ms[name].append(per_step_ms(engine.constrained_times))
        row: dict[str, dict[str, object]] = {
            name: {"tokens_per_s": round(statistics.median(v), 1)} for name, v in tps.items()
        }
        for name in SPECS:
            row[name]["vs_none"] = round(
                statistics.median(tps[name]) / statistics.median(tps["none"]), 3
            )
            # host time of a constrained step: where to look when a kind costs more than it should
            row[name]["per_step_ms"] = {
                k: round(statistics.median(r[k] for r in step_ms[name]), 3)
                for k in step_ms[name][0]
            }
        results[f"concurrent_{n}"] = row
        mx.clear_cache()
    results["compile"] = {k: {m: round(v, 2) for m, v in d.items()} for k, d in compile_ms.items()}
    results["vocabulary_build_s"] = round(vocab_s, 3)
    results["mlx_lm"] = "no structured outputs in mlx-lm: nothing to compare against"
    report(
        "structured",
        {
            "model": str(path) if ns.model else f"random {ns.random}",
            "dtype": ns.dtype,
            "gen_tokens": ns.gen_tokens,
            "prompt_tokens": len(prompt),
            "temperature": 0.8,
            "runs": ns.runs,
        },
        results,
    )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
