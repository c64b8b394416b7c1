"""LoRA training throughput and peak memory: loraforge's trainer vs mlx-lm's, same model, same data.

Prints one JSON object: it/s, tokens/s and peak memory of each, plus the ratio. Each trainer runs in
its own process (this script with --worker), so peak memory is per trainer and nothing is shared.

    python benchmarks/train.py --random-shapes 512,4,8,2,1408,32000 --iters 6      # tiny, CPU
    python benchmarks/train.py --random-7b --batch-size 4 --seq-len 512            # H200
    python benchmarks/train.py --model PATH --data ../shared/data/wikisql
    python benchmarks/train.py --random-7b --batch-size 8 --launch 2 --no-mlx-lm   # two GPUs

With --launch N our trainer also runs data-parallel on N processes (mlx.launch: NCCL on CUDA, the
ring backend elsewhere) at the same global batch, and the output adds its tokens/s, the scaling
over one process, and the largest difference between the two loss curves.

Data: "random" is fixed batch-size x seq-len batches of random tokens (every position a target);
a folder is tokenized once with our tokenizer and both trainers get the same token lists.
Timing leaves out the first --skip steps (compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES_7B = "4096,32,32,8,14336,32000"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model", help="model folder (HF format: our save_model output loads in both)"
    )
    src.add_argument(
        "--random-7b", action="store_true", help=f"random bf16 Mistral-7B ({SHAPES_7B})"
    )
    src.add_argument(
        "--random-shapes", help="dim,layers,heads,kv_heads,hidden,vocab of a random bf16 model"
    )
    p.add_argument(
        "--dtype", default="bf16", choices=["bf16", "f16", "f32"], help="random model dtype"
    )
    p.add_argument(
        "--tokenizer", help="tokenizer.model for a random model (default: mistral-common's)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lora-layers", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--quantize", type=int, choices=[4, 8], default=None)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument(
        "--pack", action="store_true", help="loraforge packs short examples into full rows"
    )
    p.add_argument("--data", default="random", help="'random' or a folder with train.jsonl")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--no-mlx-lm", action="store_true", help="run only loraforge's trainer")
    p.add_argument(
        "--launch",
        type=int,
        default=1,
        metavar="N",
        help="also run ours on N data-parallel processes (mlx.launch) at the same global batch",
    )
    p.add_argument("--worker", choices=["loraforge", "mlx_lm"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- the model folder ---------------------------------------------------------------------------
def random_model(shapes: str, dtype: str, out: Path, tokenizer: Path | None = None) -> Path:
    """A random Mistral of the given shapes saved in HF format (config.json + safetensors)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_core.config import ModelArgs
    from mlx_core.model import Mistral
    from mlx_core.weights import DTYPES, split_projections

    dim, layers, heads, kv, hidden, vocab = (int(x) for x in shapes.split(","))
    args = ModelArgs(
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        hidden_dim=hidden,
        vocab_size=vocab,
        sliding_window=4096,
        max_position_embeddings=32768,
    )
    mx.random.seed(0)
    model = Mistral(args)
    cast = DTYPES[dtype]
    # mlx annotates tree_flatten as list | dict; without `destination` it is the list.
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    # One tensor at a time: a 7B model never exists in fp32.
    for name, w in params:
        w = (
            (mx.random.normal(w.shape) * 0.02).astype(cast)
            if "norm" not in name
            else w.astype(cast)
        )
        mx.eval(w)
        model.load_weights([(name, w)], strict=False)
    out.mkdir(parents=True, exist_ok=True)
    weights = split_projections(dict(tree_flatten(model.parameters())), args)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(args.to_hf(), indent=2))
    tok = tokenizer or _tokenizer_file()
    if tok is None:
        sys.exit(
            "no tokenizer.model for the random model (mistral-common is not installed): "
            "pass --tokenizer PATH, e.g. a copy of mistral-common's tokenizer.model.v1"
        )
    (out / "tokenizer.model").write_bytes(tok.read_bytes())
    return out


def _tokenizer_file() -> Path | None:
    try:
        import importlib.resources

        path = Path(
            str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1")
        )
        return path if path.is_file() else None
    except ImportError:
        return None


def token_lists(ns: argparse.Namespace, model_dir: Path) -> list[list[int]]:
    """The training rows both trainers get: BOS + tokens + EOS per example."""
    import numpy as np

    if ns.data == "random":
        from mlx_core.config import load_config

        vocab = load_config(model_dir).vocab_size
        rng = np.random.default_rng(0)
        n = ns.batch_size * max(ns.iters, 1)
        return [rng.integers(3, vocab, ns.seq_len + 1).tolist() for _ in range(n)]
    from mlx_core.data.batches import tokenize_examples
    from mlx_core.data.formats import read_jsonl
    from mlx_core.tokenizer import Tokenizer

    examples = read_jsonl(Path(ns.data) / "train.jsonl")
    tokenized, _ = tokenize_examples(examples, Tokenizer.from_folder(model_dir), ns.seq_len + 1)
    return [list(e.tokens) for e in tokenized]


# -- workers ------------------------------------------------------------------------------------
def run_loraforge(spec: dict) -> dict:

    from mlx_core.config import Quantization
    from mlx_core.data.batches import TokenizedExample
    from mlx_core.train.config import TrainConfig, TrainData
    from mlx_core.train.events import TrainerEvent, TrainEvent
    from mlx_core.train.loop import train
    from mlx_core.weights import load_model

    folder = Path(spec["model"])
    # The product's own load path (QLoRA quantizes tensor by tensor while reading).
    loaded = load_model(
        folder, quantize=Quantization(64, spec["quantize"]) if spec["quantize"] else None
    )
    rows = [TokenizedExample(tuple(t), (False,) + (True,) * (len(t) - 1)) for t in spec["rows"]]
    steps: list[TrainEvent] = []
    config = TrainConfig(
        iters=spec["iters"],
        batch_size=spec["batch_size"],
        learning_rate=1e-5,
        lora_layers=spec["lora_layers"],
        lora_rank=spec["rank"],
        lora_alpha=2.0 * spec["rank"],
        grad_checkpoint=spec["grad_checkpoint"],
        max_seq_len=spec["seq_len"] + 1,
        steps_per_report=1,
        pack=spec.get("pack", False),
        steps_per_eval=0,
        save_every=0,
        adapter_path=spec["out"],
        progress="none",
    )

    def on_event(event: TrainerEvent) -> None:
        if isinstance(event, TrainEvent):
            steps.append(event)

    train(loaded, TrainData(rows), config, on_event=on_event)
    if not steps:  # a rank other than 0 of a launched run: rank 0 reports for all
        return {}
    timed = steps[spec["skip"] :] or steps
    return {
        "it_per_sec": statistics.median(e.it_per_sec for e in timed),
        "tokens_per_sec": statistics.median(e.tokens_per_sec for e in timed),
        "target_tokens_per_sec": statistics.median(e.target_tokens_per_sec for e in timed),
        "peak_memory_gb": max(e.peak_memory_gb for e in steps),
        "losses": [round(e.loss, 4) for e in steps],
    }


def run_mlx_lm(spec: dict) -> dict:
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(spec["model"]))
    if spec["quantize"]:
        nn.quantize(model, 64, spec["quantize"])
    model.freeze()
    linear_to_lora_layers(
        model,
        spec["lora_layers"],
        {
            "rank": spec["rank"],
            "scale": 2.0,
            "dropout": 0.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
    )
    reports: list[dict] = []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            reports.append(info)

    args = TrainingArgs(
        batch_size=spec["batch_size"],
        iters=spec["iters"],
        val_batches=0,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=spec["seq_len"] + 1,
        grad_checkpoint=spec["grad_checkpoint"],
        adapter_file=str(Path(spec["out"]) / "adapters.safetensors"),
    )
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    dataset = [(row, 0) for row in spec["rows"]]
    train(
        model, optim.Adam(learning_rate=1e-5), dataset, None, args=args, training_callback=Collect()
    )
    timed = reports[spec["skip"] :] or reports
    # mlx-lm counts every non-padding target token (all of them here, as in ours).
    return {
        "it_per_sec": statistics.median(r["iterations_per_second"] for r in timed),
        "tokens_per_sec": statistics.median(r["tokens_per_second"] for r in timed),
        "peak_memory_gb": max(r["peak_memory"] for r in reports),
        "losses": [round(r["train_loss"], 4) for r in reports],
    }


def _worker(kind: str, spec: dict, ranks: int = 1) -> dict:
    from mlx_core.train.launch import launch_command

    spec_file = Path(spec["out"] + ".spec.json")  # token lists are too long for a command line
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    script = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    cmd = launch_command(ranks, [*script, "--spec", str(spec_file)])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    marker = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not marker:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-5:]}
    return json.loads(marker[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.worker:
        spec = json.loads(Path(ns.spec).read_text())
        result = run_loraforge(spec) if ns.worker == "loraforge" else run_mlx_lm(spec)
        if result:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    import mlx.core as mx

    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        if ns.model:
            model_dir = Path(ns.model)
        else:
            shapes = SHAPES_7B if ns.random_7b else (ns.random_shapes or "512,4,8,2,1408,32000")
            model_dir = random_model(
                shapes, ns.dtype, Path(tmp) / "model", Path(ns.tokenizer) if ns.tokenizer else None
            )
        rows = token_lists(ns, model_dir)
        spec = {
            "model": str(model_dir),
            "rows": rows,
            "iters": ns.iters,
            "batch_size": ns.batch_size,
            "seq_len": ns.seq_len,
            "lora_layers": ns.lora_layers,
            "rank": ns.rank,
            "quantize": ns.quantize,
            "grad_checkpoint": ns.grad_checkpoint,
            "skip": ns.skip,
            "pack": ns.pack,
        }
        ours = _worker("loraforge", {**spec, "out": str(Path(tmp) / "ours")})
        theirs = (
            None if ns.no_mlx_lm else _worker("mlx_lm", {**spec, "out": str(Path(tmp) / "mlx_lm")})
        )
        launched = (
            _worker("loraforge", {**spec, "out": str(Path(tmp) / "launched")}, ns.launch)
            if ns.launch > 1
            else None
        )
    out = {
        "benchmark": "train",
        "device": mx.default_device().type.name
        if hasattr(mx.default_device().type, "name")
        else str(mx.default_device()),
        "model": ns.model
        or (
            "random-7b" if ns.random_7b else f"random {ns.random_shapes or '512,4,8,2,1408,32000'}"
        ),
        "settings": {
            k: getattr(ns, k)
            for k in (
                "batch_size",
                "seq_len",
                "lora_layers",
                "rank",
                "quantize",
                "grad_checkpoint",
                "data",
                "iters",
                "skip",
                "dtype",
                "pack",
                "launch",
            )
        },
        "loraforge": ours,
        "mlx_lm": theirs,
    }
    if launched is not None:
        out[f"loraforge_{ns.launch}_processes"] = launched
        if "error" not in ours and "error" not in launched:
            out["scaling_tokens_per_sec"] = round(
                launched["tokens_per_sec"] / ours["tokens_per_sec"], 3
            )
            out["loss_max_abs_diff"] = max(
                abs(a - b) for a, b in zip(ours["losses"], launched["losses"], strict=True)
            )
    if theirs and "error" not in ours and "error" not in theirs:
        out["speedup_tokens_per_sec"] = round(ours["tokens_per_sec"] / theirs["tokens_per_sec"], 3)
        out["peak_memory_ratio"] = round(ours["peak_memory_gb"] / theirs["peak_memory_gb"], 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
