"""Execution accuracy before and after a LoRA fine-tune, run as a user runs it: the `loraforge` CLI.

    python benchmarks/finetune.py --data sql                        # `loraforge demo-data` output
    python benchmarks/finetune.py --data ../shared/data/wikisql --iters 500

Runs `loraforge eval` on the base model, `loraforge lora --train` (prompt masked, loss on the SQL
after "A:" and its EOS), then `loraforge eval` with the adapter, all on the test split, and
prints one JSON object: both evaluations' execution accuracy, exact match and stop rate, and the
training's wall time. The model defaults to the embedded demo model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import report  # noqa: E402

CLI = [sys.executable, "-m", "server.cli"]
SCORES = ("execution_accuracy", "exact_match", "stop_rate", "valid_sql_rate")


def evaluate(ns: argparse.Namespace, adapter: Path | None) -> dict:
    cmd = [*CLI, "eval", "--data", str(ns.data), "--json", "--samples", "0"]
    cmd += ["--model", ns.model] if ns.model else []
    cmd += ["--adapter", str(adapter)] if adapter else []
    cmd += ["--max-examples", str(ns.max_examples)] if ns.max_examples else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    sql = json.loads(out)["sql"]
    return {"n": sql["n"], **{k: sql[k] for k in SCORES}}


def train(ns: argparse.Namespace, adapter: Path) -> float:
    cmd = [
        *CLI,
        "lora",
        "--train",
        "--data",
        str(ns.data),
        "--adapter-file",
        str(adapter),
        "--iters",
        str(ns.iters),
        "--batch-size",
        str(ns.batch_size),
        "--learning-rate",
        str(ns.learning_rate),
        "--lora-layers",
        str(ns.lora_layers),
        "--mask-prompt",
        "--completion-after",
        "A:",
        "--steps-per-eval",
        str(ns.iters),
        "--seed",
        str(ns.seed),
    ]
    cmd += ["--model", ns.model] if ns.model else []
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="folder with train/valid/test.jsonl")
    p.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--lora-layers", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-examples", type=int, default=None, help="evaluate the first N test examples"
    )
    ns = p.parse_args()
    ns.data = ns.data.resolve()
    before = evaluate(ns, None)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapters.npz"
        seconds = train(ns, adapter)
        after = evaluate(ns, adapter)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()}
    report(
        "finetune",
        config,
        {
            "before": before,
            "after": after,
            "train_seconds": round(seconds, 1),
            "execution_gain": round(after["execution_accuracy"] - before["execution_accuracy"], 4),
        },
    )


if __name__ == "__main__":
    main()
