"""Build the embedded demo model from nothing: `python -m mlx_core.demo.build`.

corpus (seeded schema-reading tables, held-out words and phrasings kept out; WikiSQL's train
split mixed in, values copied) -> sentencepiece tokenizer -> full-parameter pretraining ->
weights cast to the shipped dtype -> evaluation of the saved folder as `load_model` reads it ->
`<out>/{config.json, model.safetensors, tokenizer.model, build.json}`.

The defaults are the recipe for one GPU (batch 192, 6,000 steps: minutes on an H200); the same
command runs on a CPU, only slower, and `--smoke` is a small model and run for checking a CPU
build in minutes. Seeded throughout: a rebuild reaches the same metrics (not the same bits on
another machine: float sums round differently). Intermediate files (corpus, tokenizer,
checkpoints) live in --work-dir, never in the assets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, astuple, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_core.config import ModelArgs
from mlx_core.cpu_blas import OPENBLAS, openblas_loaded, set_openblas_threads
from mlx_core.data.formats import TextExample, read_jsonl
from mlx_core.demo import ASSET_FILES, assets_dir
from mlx_core.demo.columns import MadeUp
from mlx_core.demo.pretrain import PretrainConfig, cast_parameters, pretrain
from mlx_core.demo.quality import SqlQuality, sql_quality
from mlx_core.demo.schema_corpus import HELD_OUT_FRACTION, generate_examples, write_dataset
from mlx_core.demo.tokenizer_train import TokenizerConfig, train_tokenizer
from mlx_core.demo.training_set import training_examples
from mlx_core.demo.wikisql_mix import wikisql_train
from mlx_core.model import Mistral
from mlx_core.tokenizer import Tokenizer
from mlx_core.weights import DTYPES, load_model, save_model

MAX_ASSET_BYTES = 32 * 2**20  # the package ships the weights: keep the wheel small
# train.jsonl is mixed into the corpus, test.jsonl only measured; valid.jsonl is never read.
WIKISQL_DIR = Path("/work/shared/data/wikisql")


@dataclass(frozen=True)
class ModelShape:
    # Depth over width: copying a column or a value is attention's work (a head that finds the
    # span, one that moves it), and 8 layers of 256 fit 32 MB of fp32 with a 4,096-piece vocab.
    dim: int = 256
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 768
    max_position_embeddings: int = 1024  # corpus examples are < 200 tokens; WikiSQL's < 300
    tie_word_embeddings: bool = True  # a 4,096 x 256 table once, not twice: 4 MB more layers

    def args(self, vocab_size: int) -> ModelArgs:
        return ModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            hidden_dim=self.hidden_dim,
            vocab_size=vocab_size,
            rope_theta=10000.0,
            sliding_window=None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    n_train: int = 300_000  # synthetic training examples (the "train" part of schema_corpus)
    n_valid: int = 500
    n_test: int = 1_000  # synthetic tables of training words and phrasings, none trained on
    n_held_out: int = 500  # per held-out part: new words, new phrasings, French questions
    n_probe: int = 200  # held-out-vocabulary examples generated at every evaluation in training
    wikisql_copies: int = 10  # WikiSQL's 1,000 train examples, repeated (values copied)
    # Shares of the training examples written as a chat (the Mistral template, so
    # /v1/chat/completions works) and with the prompt ending "A: " (as many clients send it).
    chat_fraction: float = 0.25
    space_fraction: float = 0.25
    question_loss: bool = True  # the "A:" examples learn their question too (training_set.py)
    # How often the training tables' column words and names are made up (the measured sets keep
    # the default). More made-up words trade in-distribution and WikiSQL accuracy for copying
    # held-out words at the same compute (benchmarks/NOTES.md section 6).
    made_up: MadeUp = field(default_factory=MadeUp)
    dtype: str = (
        "f32"  # shipped in fp32: on a Linux CPU only fp32 matmuls get a fast BLAS (cpu_blas.py)
    )
    eval_batch_size: int = 128
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=4096))
    model: ModelShape = field(default_factory=ModelShape)
    pretrain: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(
            steps=6000,
            batch_size=192,
            learning_rate=1e-3,
            warmup_steps=300,
            eval_every=1500,
            checkpoint_every=1500,
            parallel_streams=1,
        )
    )


# A CPU check of the whole build, ~35 minutes on 2 busy cores: a 1.3M-parameter model whose
# copying sets in after ~800 steps (answer loss 2.7 -> 0.9 from step 500 to 1,000).
SMOKE = {
    "n_train": 100_000,
    "n_test": 300,
    "n_held_out": 300,
    "n_probe": 100,
    "wikisql_copies": 5,
    "steps": 4000,
    "batch_size": 32,
    "learning_rate": 2e-3,
    "dim": 128,
    "hidden_dim": 384,
    "layers": 4,
    "eval_every": 500,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- CPU speed ---------------------------------------------------------------------------------
def matmul_gflops(n: int = 512, repeats: int = 4) -> float:
    """fp32 matmul speed of the default device, to tell a reference BLAS from a fast one."""
    a = mx.random.normal((n, n))
    mx.eval(a, a @ a)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ a)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def speed_hint(gflops: float) -> str | None:
    """A hint for a Linux CPU build running on MLX's slow reference BLAS, or None."""
    if mx.default_device() != mx.cpu or platform.system() != "Linux" or openblas_loaded():
        return None
    how = f"LD_PRELOAD={OPENBLAS} python -m mlx_core.demo.build ..."
    if not OPENBLAS.exists():
        how = f"apt-get install libopenblas0-pthread, then run with {how}"
    return (
        f"fp32 matmuls run at {gflops:.0f} GFLOP/s on MLX's bundled reference BLAS; "
        f"OpenBLAS makes this build ~20x faster: {how}"
    )


# -- steps ---------------------------------------------------------------------------------------
def _texts(path: Path) -> list[str]:
    return [e.text for e in read_jsonl(path) if isinstance(e, TextExample)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(config: BuildConfig, out: Path, work: Path, resume: bool, wikisql: Path | None) -> dict:
    """Run the whole build; return what build.json holds."""
    started = time.perf_counter()
    gflops = matmul_gflops()
    log(f"device {mx.default_device()}; fp32 matmul {gflops:.0f} GFLOP/s")
    if hint := speed_hint(gflops):
        log(f"hint: {hint}")
    on_cpu = mx.default_device() == mx.cpu
    if on_cpu and config.pretrain.parallel_streams > 1 and set_openblas_threads(1):
        # each stream a core of its own, not two streams' BLAS threads fighting over the cores
        log(f"OpenBLAS set to one thread per stream ({config.pretrain.parallel_streams} streams)")

    data = work / "data"
    log(f"corpus: {config.n_train}/{config.n_valid}/{config.n_test} examples, seed {config.seed}")
    write_dataset(
        data, config.n_train, config.n_valid, config.n_test, config.seed, made_up=config.made_up
    )
    train_texts, valid_texts, test_texts = (
        _texts(data / f"{s}.jsonl") for s in ("train", "valid", "test")
    )
    wikisql_note = "none"
    if wikisql is not None and (wikisql / "train.jsonl").is_file():
        mixed = wikisql_train(wikisql / "train.jsonl", config.wikisql_copies)
        train_texts += mixed
        wikisql_note = f"{wikisql / 'train.jsonl'} x {config.wikisql_copies}"
        log(f"WikiSQL: {len(mixed)} training examples from {wikisql_note}")
    else:
        log(f"WikiSQL: no train.jsonl in {wikisql}: building without it (--wikisql-dir DIR)")
    # One order for the tokenizer and the model: WikiSQL's lines then shape the vocabulary too.
    random.Random(f"order:{config.seed}").shuffle(train_texts)
    tok_path = train_tokenizer(train_texts, work / "tokenizer.model", config.tokenizer)
    tokenizer = Tokenizer.from_file(tok_path)
    log(f"tokenizer: {tokenizer.vocab_size} pieces -> {tok_path}")

    max_len = config.pretrain.max_seq_len
    shapes = (config.chat_fraction, config.space_fraction)
    train_set = training_examples(
        train_texts, tokenizer, max_len, *shapes, config.seed, config.question_loss
    )
    # valid loss: the answers alone, the number that says how well SQL is written
    valid_set = training_examples(valid_texts, tokenizer, max_len, *shapes, config.seed + 1)
    n_tokens = sum(len(e.tokens) for e in train_set)
    log(f"tokenized: {n_tokens} training tokens ({n_tokens / len(train_set):.1f} per example)")

    args = config.model.args(tokenizer.vocab_size)
    # What the checkpoints depend on (pretrain() adds its own config and the model's shape).
    identity = {
        "corpus": [
            config.seed,
            config.n_train,
            wikisql_note,
            *shapes,
            config.question_loss,
            # only when changed: checkpoints of the shipped recipe keep their identity
            *(() if config.made_up == MadeUp() else astuple(config.made_up)),
        ],
        "tokenizer_sha256": _sha256(tok_path),
    }
    held = config.seed + 1  # held-out sets: other tables than the training stream's
    probe_texts = generate_examples(config.n_probe, held, "vocabulary")

    def probe(model: Mistral) -> str:  # generation on tables of words never trained on
        return "probe (held-out words): " + sql_quality(model, tokenizer, probe_texts).line()

    model, result = pretrain(
        args,
        train_set,
        valid_set,
        config.pretrain,
        work,
        identity,
        resume=resume,
        log=log,
        probe=probe if config.n_probe else None,
    )

    # Save in the shipped precision, then evaluate exactly what ships, loaded the way users load it.
    cast_parameters(model, DTYPES[config.dtype])
    staged = work / "assets"
    shutil.rmtree(staged, ignore_errors=True)
    save_model(staged, model, tokenizer)
    size = sum((staged / f).stat().st_size for f in ASSET_FILES)
    if size > MAX_ASSET_BYTES:
        raise ValueError(
            f"the assets take {size / 2**20:.1f} MB, over the "
            f"{MAX_ASSET_BYTES / 2**20:.0f} MB budget: build a smaller model"
        )
    loaded = load_model(staged)
    log("evaluating the saved model (greedy, no stop sequences)")
    metrics: dict[str, dict] = {}
    vocabulary = generate_examples(config.n_held_out, held, "vocabulary")
    runs: list[tuple[str, list[str], bool, bool]] = [  # name, examples, chat, prompt "A: "
        ("synthetic_test", test_texts, False, False),
        ("held_out_vocabulary", vocabulary, False, False),
        ("held_out_vocabulary_space", vocabulary, False, True),
        ("held_out_phrasing", generate_examples(config.n_held_out, held, "phrasing"), False, False),
        # the fine-tuning showcase's set: a question style the model never saw
        ("french", generate_examples(config.n_held_out, held, "french"), False, False),
        ("synthetic_test_chat", test_texts, True, False),
    ]
    if wikisql is not None and (wikisql / "test.jsonl").is_file():
        runs.append(("wikisql_test", _texts(wikisql / "test.jsonl"), False, False))
    for name, texts, chat, space in runs:
        t = time.perf_counter()
        quality: SqlQuality = sql_quality(
            loaded.model,
            loaded.tokenizer,
            texts,
            batch_size=config.eval_batch_size,
            chat=chat,
            prompt_suffix=" " if space else "",
        )
        metrics[name] = asdict(quality)
        log(f"{name}: {quality.line()} in {time.perf_counter() - t:.0f} s")

    build_seconds = round(time.perf_counter() - started)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m mlx_core.demo.build " + " ".join(sys.argv[1:]),
        "seed": config.seed,
        "held_out": {
            "fraction_of_words": HELD_OUT_FRACTION,
            "parts": ["vocabulary", "phrasing", "french"],
        },
        "wikisql_train": wikisql_note,
        "steps": config.pretrain.steps,
        "config": asdict(config),
        "model_args": asdict(args),
        "parameters": int(sum(v.size for v in _leaves(loaded.model.parameters()))),
        "asset_bytes": size,
        "training": {
            "train_loss": result.train_loss,
            "valid_loss": result.valid_loss,
            "seconds": round(result.seconds),
            "tokens": result.tokens,
        },
        "metrics": metrics,
        "build_seconds": build_seconds,
        "machine": {
            "platform": platform.platform(),
            "device": str(mx.default_device()),
            "fp32_matmul_gflops": round(gflops, 1),
            "mlx": mx.__version__,  # type: ignore[attr-defined]  # missing from mlx.core stubs
        },
    }
    (staged / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != staged.resolve():
        for name in (*ASSET_FILES, "build.json"):
            shutil.copyfile(staged / name, out / name)
    log(f"wrote {out} ({size / 2**20:.1f} MB) in {build_seconds / 60:.0f} min")
    return record


def _leaves(tree: dict | list | mx.array) -> list[mx.array]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mlx_core.demo.build",
        description="Rebuild the embedded demo text-to-SQL model (corpus, tokenizer, "
        "pretraining, evaluation); the defaults reproduce the shipped assets.",
    )
    d = BuildConfig()
    p.add_argument(
        "--out",
        type=Path,
        default=assets_dir(),
        help="where the assets go (default: the package's mlx_core/demo/assets)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("build/demo-model"),
        help="corpus, tokenizer and checkpoints (default: build/demo-model)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a small model and run for checking the build on a CPU in ~35 minutes "
        "(explicit flags still win); never ship its assets",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --work-dir"
    )
    p.add_argument(
        "--wikisql-dir",
        type=Path,
        default=WIKISQL_DIR,
        help="folder with WikiSQL-format train.jsonl (mixed into the corpus) and test.jsonl "
        f"(measured, never trained on); default {WIKISQL_DIR}, skipped if absent",
    )
    # Knobs for experiments; the defaults are the shipped build's (or --smoke's).
    for flag in (
        "n-train",
        "n-test",
        "n-held-out",
        "wikisql-copies",
        "batch-size",
        "dim",
        "layers",
        "hidden-dim",
        "heads",
        "kv-heads",
        "warmup-steps",
        "eval-every",
        "vocab-size",
    ):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument(
        "--made-up-columns",
        type=float,
        default=None,
        help=f"share of training column words that are made up (default {d.made_up.column_word})",
    )
    p.add_argument(
        "--made-up-names",
        type=float,
        default=None,
        help=f"share of training first/last names that are made up (default {d.made_up.name_part})",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=None,
        help="device streams a step's rows are split over (default: 2 on a CPU, one core "
        "each; 1 on a GPU)",
    )
    ns = p.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    o: dict[str, Any] = {**(SMOKE if ns.smoke else {}), **given}  # explicit flags over the preset

    def get(key: str, default: Any) -> Any:
        return o.get(key, default)

    steps = int(get("steps", d.pretrain.steps))
    on_cpu = mx.default_device() == mx.cpu
    config = replace(
        d,
        seed=ns.seed,
        n_train=get("n_train", d.n_train),
        n_test=get("n_test", d.n_test),
        n_held_out=get("n_held_out", d.n_held_out),
        n_probe=get("n_probe", d.n_probe),
        wikisql_copies=get("wikisql_copies", d.wikisql_copies),
        made_up=MadeUp(
            get("made_up_columns", d.made_up.column_word), get("made_up_names", d.made_up.name_part)
        ),
        tokenizer=replace(d.tokenizer, vocab_size=get("vocab_size", d.tokenizer.vocab_size)),
        model=replace(
            d.model,
            dim=get("dim", d.model.dim),
            n_layers=get("layers", d.model.n_layers),
            hidden_dim=get("hidden_dim", d.model.hidden_dim),
            n_heads=get("heads", d.model.n_heads),
            n_kv_heads=get("kv_heads", d.model.n_kv_heads),
        ),
        pretrain=replace(
            d.pretrain,
            steps=steps,
            seed=ns.seed,
            batch_size=get("batch_size", d.pretrain.batch_size),
            learning_rate=get("learning_rate", d.pretrain.learning_rate),
            eval_every=get("eval_every", d.pretrain.eval_every),
            checkpoint_every=get("eval_every", d.pretrain.checkpoint_every),
            parallel_streams=get("streams", 2 if on_cpu else 1),
            warmup_steps=min(
                int(get("warmup_steps", d.pretrain.warmup_steps)),
                max(steps // 10, 1),
            ),
        ),
    )
    build(config, ns.out.resolve(), ns.work_dir.resolve(), ns.resume, ns.wikisql_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
