"""Build the embedded demo model from nothing: `python -m mlx_core.demo.build`.

corpus (seeded, one domain held out) -> sentencepiece tokenizer -> full-parameter pretraining
-> weights cast to the shipped dtype -> evaluation of the saved folder as `load_model` reads it
-> `<out>/{config.json, model.safetensors, tokenizer.model, build.json}`.

The defaults below are the settings that produced the shipped assets; a rebuild with them
reaches the same metrics (not the same bits: float sums on another machine round differently).
Intermediate files (corpus, tokenizer, checkpoints) live in --work-dir, never in the assets.
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
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import mlx.core as mx

from mlx_core.config import ModelArgs
from mlx_core.cpu_blas import OPENBLAS, openblas_loaded, set_openblas_threads
from mlx_core.data.batches import TokenizedExample, tokenize_examples
from mlx_core.data.formats import TextExample, parse_example, read_jsonl
from mlx_core.demo import ASSET_FILES, assets_dir
from mlx_core.demo.augment import augment
from mlx_core.demo.corpus import DOMAINS, generate_examples, to_chat, write_dataset
from mlx_core.demo.pretrain import PretrainConfig, cast_parameters, latest_checkpoint, pretrain
from mlx_core.demo.quality import SqlQuality, sql_quality
from mlx_core.demo.tokenizer_train import TokenizerConfig, train_tokenizer
from mlx_core.model import Mistral
from mlx_core.tokenizer import Tokenizer
from mlx_core.weights import DTYPES, load_model, save_model

MAX_ASSET_BYTES = 20 * 2**20  # the package ships the weights: keep the wheel small
WIKISQL_TEST = Path("/work/shared/data/wikisql/test.jsonl")  # evaluation only, never trained on


@dataclass(frozen=True)
class ModelShape:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 640
    max_position_embeddings: int = 1024  # corpus examples are < 200 tokens; WikiSQL's < 300
    tie_word_embeddings: bool = False

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
    held_out_domain: str = "mountains"  # never in pretraining: the LoRA fine-tuning showcase
    n_train: int = 200_000
    n_valid: int = 500
    n_test: int = 1_000  # synthetic held-out tables (write_dataset keeps splits table-disjoint)
    n_held_out_domain: int = 500
    n_probe: int = 200  # test examples generated at every evaluation during training
    fresh_value_rate: float = 0.5  # training conditions whose text value is made up (augment.py)
    dtype: str = (
        "f32"  # shipped in fp32: on a Linux CPU only fp32 matmuls get a fast BLAS (cpu_blas.py)
    )
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelShape = field(default_factory=ModelShape)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # Stage 2: the stage-1 model goes on learning with this share of its examples wrapped in the
    # Mistral chat template, so /v1/chat/completions works on the demo as well as completions.
    chat_fraction: float = 0.5
    chat_stage: PretrainConfig = field(
        default_factory=lambda: PretrainConfig(
            steps=1000,
            learning_rate=3e-4,
            warmup_steps=50,
            min_lr_ratio=0.1,
            eval_every=250,
            checkpoint_every=250,
        )
    )


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


def _tokenized(
    texts: list[str],
    tokenizer: Tokenizer,
    max_seq_len: int,
    chat_fraction: float = 0.0,
    seed: int = 0,
) -> list[TokenizedExample]:
    # Loss on the SQL answer and its EOS only: predicting random table ids and values in the
    # prompt teaches nothing, and the answer is what the model is for. A `chat_fraction` share
    # of the examples (chosen by `seed`) is wrapped in the chat template, answer = assistant turn.
    chooser = random.Random(f"chat-stage:{seed}")
    examples, report = tokenize_examples(
        [
            parse_example(to_chat(t), "demo corpus")
            if chooser.random() < chat_fraction
            else TextExample(t)
            for t in texts
        ],
        tokenizer,
        max_seq_len,
        mask_prompt=True,
        completion_after="A:",
    )
    if report.n_dropped:
        raise ValueError(report.warning())
    return examples


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(config: BuildConfig, out: Path, work: Path, resume: bool, wikisql: Path | None) -> dict:
    """Run the whole build; return what build.json holds."""
    started = time.perf_counter()
    if config.held_out_domain not in DOMAINS:
        raise ValueError(f"held-out domain {config.held_out_domain!r}: choose from {DOMAINS}")
    gflops = matmul_gflops()
    log(f"device {mx.default_device()}; fp32 matmul {gflops:.0f} GFLOP/s")
    if hint := speed_hint(gflops):
        log(f"hint: {hint}")
    if config.pretrain.parallel_streams > 1 and set_openblas_threads(1):
        # each stream a core of its own, not two streams' BLAS threads fighting over the cores
        log(f"OpenBLAS set to one thread per stream ({config.pretrain.parallel_streams} streams)")

    data = work / "data"
    log(
        f"corpus: {config.n_train}/{config.n_valid}/{config.n_test} examples, seed {config.seed}, "
        f"without domain {config.held_out_domain!r} -> {data}"
    )
    write_dataset(
        data,
        config.n_train,
        config.n_valid,
        config.n_test,
        config.seed,
        exclude_domains=(config.held_out_domain,),
    )
    train_texts, valid_texts, test_texts = (
        _texts(data / f"{s}.jsonl") for s in ("train", "valid", "test")
    )
    tok_path = train_tokenizer(train_texts, work / "tokenizer.model", config.tokenizer)
    tokenizer = Tokenizer.from_file(tok_path)
    log(f"tokenizer: {tokenizer.vocab_size} pieces -> {tok_path}")

    max_len = config.pretrain.max_seq_len
    # The tokenizer learns from the corpus as it is; the model from it with some values made up.
    train_texts = augment(train_texts, config.seed, config.fresh_value_rate)
    train_set = _tokenized(train_texts, tokenizer, max_len)
    valid_set = _tokenized(valid_texts, tokenizer, max_len)
    n_tokens = sum(len(e.tokens) for e in train_set)
    log(f"tokenized: {n_tokens} training tokens ({n_tokens / len(train_set):.1f} per example)")

    args = config.model.args(tokenizer.vocab_size)
    # What the checkpoints depend on (pretrain() adds its own config and the model's shape).
    identity = {
        "corpus": [config.seed, config.held_out_domain, config.n_train, config.fresh_value_rate],
        "tokenizer_sha256": _sha256(tok_path),
    }
    probe_texts = test_texts[: config.n_probe]

    def probe(model: Mistral) -> str:  # generation quality during training, on a few test tables
        return "probe: " + sql_quality(model, tokenizer, probe_texts).line()

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
    if config.chat_stage.steps:
        stage1 = latest_checkpoint(work)
        assert stage1 is not None  # pretrain() always saves its last step
        log(f"stage 2: {config.chat_fraction:.0%} of the examples as chats, from {stage1}")
        chat_train = _tokenized(train_texts, tokenizer, max_len, config.chat_fraction, config.seed)
        chat_valid = _tokenized(valid_texts, tokenizer, max_len, config.chat_fraction, config.seed)
        chat_identity = {
            **identity,
            "stage1": asdict(config.pretrain),
            "chat_fraction": config.chat_fraction,
        }

        def probe_chat(model: Mistral) -> str:
            return (
                f"{probe(model)} | chat "
                + sql_quality(model, tokenizer, probe_texts, chat=True).line()
            )

        model, result = pretrain(
            args,
            chat_train,
            chat_valid,
            config.chat_stage,
            work / "chat",
            chat_identity,
            resume=resume,
            log=log,
            probe=probe_chat if config.n_probe else None,
            init=stage1 / "model.safetensors",
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
    evals = {
        "synthetic_test": test_texts,
        "held_out_domain": generate_examples(
            config.n_held_out_domain, config.seed + 1, domains=(config.held_out_domain,)
        ),
    }
    if wikisql is not None and wikisql.is_file():
        evals["wikisql_test"] = _texts(wikisql)
    runs = [(name, texts, False) for name, texts in evals.items()]
    runs.append(
        ("synthetic_test_chat", test_texts, True)
    )  # the same tables through the chat template
    for name, texts, chat in runs:
        t = time.perf_counter()
        quality: SqlQuality = sql_quality(loaded.model, loaded.tokenizer, texts, chat=chat)
        metrics[name] = asdict(quality)
        log(f"{name}: {quality.line()} in {time.perf_counter() - t:.0f} s")

    build_seconds = round(time.perf_counter() - started)
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m mlx_core.demo.build " + " ".join(sys.argv[1:]),
        "seed": config.seed,
        "held_out_domain": config.held_out_domain,
        "steps": config.pretrain.steps + config.chat_stage.steps,  # stage 1 + the chat stage
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
    p.add_argument("--steps", type=int, default=d.pretrain.steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --work-dir"
    )
    p.add_argument(
        "--wikisql",
        type=Path,
        default=WIKISQL_TEST,
        help="WikiSQL-format JSONL to report accuracy on, if present (never trained on)",
    )
    # Knobs for experiments; the defaults are the shipped build's.
    p.add_argument("--n-train", type=int, default=d.n_train)
    p.add_argument("--batch-size", type=int, default=d.pretrain.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.pretrain.learning_rate)
    p.add_argument("--dim", type=int, default=d.model.dim)
    p.add_argument("--layers", type=int, default=d.model.n_layers)
    p.add_argument("--hidden-dim", type=int, default=d.model.hidden_dim)
    p.add_argument("--heads", type=int, default=d.model.n_heads)
    p.add_argument("--kv-heads", type=int, default=d.model.n_kv_heads)
    p.add_argument("--warmup-steps", type=int, default=d.pretrain.warmup_steps)
    p.add_argument("--eval-every", type=int, default=d.pretrain.eval_every)
    p.add_argument(
        "--streams",
        type=int,
        default=d.pretrain.parallel_streams,
        help="CPU streams (cores) a step's rows are split over",
    )
    p.add_argument("--vocab-size", type=int, default=d.tokenizer.vocab_size)
    ns = p.parse_args(argv)
    config = replace(
        d,
        seed=ns.seed,
        n_train=ns.n_train,
        tokenizer=replace(d.tokenizer, vocab_size=ns.vocab_size),
        model=replace(
            d.model,
            dim=ns.dim,
            n_layers=ns.layers,
            hidden_dim=ns.hidden_dim,
            n_heads=ns.heads,
            n_kv_heads=ns.kv_heads,
        ),
        pretrain=replace(
            d.pretrain,
            steps=ns.steps,
            seed=ns.seed,
            batch_size=ns.batch_size,
            learning_rate=ns.learning_rate,
            eval_every=ns.eval_every,
            parallel_streams=ns.streams,
            warmup_steps=min(ns.warmup_steps, max(ns.steps // 10, 1)),
        ),
    )
    build(config, ns.out.resolve(), ns.work_dir.resolve(), ns.resume, ns.wikisql)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
