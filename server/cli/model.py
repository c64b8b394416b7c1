"""`loraforge generate | convert`: model tools that need no server."""

from __future__ import annotations

import argparse
import json
import sys

from mlx_core.config import Quantization


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt (prints tokens/s)")
    g.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--adapter", default=None, help="adapter folder or .npz file to apply")
    g.add_argument("--max-tokens", "-m", type=int, default=100)
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the Mistral instruct template"
    )
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    g.set_defaults(run=run_generate)

    c = sub.add_parser("convert", help="convert a model folder to loraforge's MLX format")
    c.add_argument(
        "--model",
        required=True,
        help="source: HF folder, Mistral consolidated.00.pth "
        "folder, or mlx-examples convert.py output",
    )
    c.add_argument("--out", required=True, help="destination folder")
    c.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None)
    c.add_argument("--quantize", "-q", type=int, choices=[4, 8], default=None)
    c.add_argument("--group-size", type=int, default=64)
    c.set_defaults(run=run_convert)


def run_generate(ns: argparse.Namespace) -> int:
    from mlx_core.demo import resolve_model_path
    from mlx_core.engine import Engine, timed_generate
    from mlx_core.sampling import SamplingParams
    from mlx_core.tokenizer import ChatMessage
    from mlx_core.weights import load_model

    loaded = load_model(resolve_model_path(ns.model))
    adapter_id = None
    slots = None
    if ns.adapter:
        from mlx_core.lora.formats import load_adapter
        from mlx_core.lora.slots import AdapterSlots

        adapter = load_adapter(ns.adapter, loaded.args)
        adapter.check_fits(loaded.args)
        slots = AdapterSlots(
            loaded.model, max_loaded=1, max_rank=max(adapter.rank, 1), loader=lambda _: adapter
        )
        adapter_id = "cli"
    tok = loaded.tokenizer
    if ns.chat:
        prompt = tok.encode_chat([ChatMessage("user", ns.prompt)])
    else:
        prompt = tok.encode(ns.prompt)
    engine = Engine(loaded.model, tok, adapter_slots=slots)
    params = SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temp,
        top_p=ns.top_p,
        seed=ns.seed,
        stop=tuple(ns.stop),
    )
    text, stats = timed_generate(engine, prompt, params, adapter_id, chat=ns.chat)
    if ns.json:
        print(json.dumps({"text": text, **stats}))
        return 0
    print(("" if ns.chat else ns.prompt) + text)
    print("=" * 10, file=sys.stderr)
    print(
        f"Prompt: {stats['prompt_tokens']} tokens, {stats['prompt_tps']:.1f} tokens/s",
        file=sys.stderr,
    )
    print(
        f"Generation: {stats['generation_tokens']} tokens, {stats['generation_tps']:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def run_convert(ns: argparse.Namespace) -> int:
    from mlx_core.weights import convert

    q = Quantization(ns.group_size, ns.quantize) if ns.quantize else None
    out = convert(ns.model, ns.out, dtype=ns.dtype, quantize=q)
    print(f"wrote {out}")
    return 0
