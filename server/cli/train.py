"""`loraforge train | lora`: LoRA fine-tuning from the command line.

`train` exposes every TrainConfig knob. `lora` takes mlx-examples' Dec-2023 `lora.py` flags
verbatim, so the blog's `python lora.py --model ... --train --iters 600` works as
`loraforge lora --model ... --train --iters 600`, but with that script's failures fixed: EOS is
appended to every example (the model learns to stop), the memory preflight says what fits
instead of running out of memory, and prompt masking is available (`--mask-prompt`,
`--completion-after "A:"`), off by default as in the seed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from mlx_core.train.config import TrainConfig

_DEFAULTS = TrainConfig()

# TrainConfig field -> help text for `loraforge train` (the flag is the field with dashes).
_TRAIN_FLAGS: dict[str, str] = {
    "iters": "optimizer steps to train for",
    "batch_size": "examples per micro-batch (over all processes)",
    "learning_rate": "peak learning rate",
    "optimizer": "adam or adamw",
    "weight_decay": "AdamW weight decay",
    "lr_schedule": "constant or cosine (after warmup)",
    "warmup_steps": "linear warmup steps",
    "min_lr_ratio": "cosine decays to learning_rate * this",
    "grad_accumulation": "micro-batches per optimizer step (same result, less memory)",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "grad_checkpoint": "recompute layer activations in the backward pass (less memory, ~30%% slower)",
    "seed": "seed for LoRA init, data order and dropout",
    "max_seq_len": "longest example in tokens (BOS and EOS included); longer prompts are cut from the left",
    "mask_prompt": "learn only completions / assistant replies (needs --completion-after for text examples)",
    "completion_after": "marker splitting a text example into prompt and completion, e.g. 'A:'",
    "pack": "pack several examples into each row (attention stays within an example)",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = alpha / rank)",
    "lora_dropout": "dropout on the LoRA input",
    "lora_layers": "adapt the last N layers (-1: all)",
    "targets": "comma-separated projections to adapt (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)",
    "steps_per_report": "steps between train-loss reports",
    "steps_per_eval": "steps between validation losses (0: only at the start and end)",
    "val_batches": "validation batches per evaluation (-1: all)",
    "save_every": "steps between checkpoints (0: none)",
    "keep_checkpoints": "keep only the newest N checkpoints (0: all)",
    "adapter_path": "folder for the adapter and its checkpoints/",
    "adapter_file": "also write the final adapter as this .npz (+ .json)",
    "init_adapter": "start from this adapter's weights (fresh optimizer)",
    "events_jsonl": "append JSON-lines events here (the fine-tune worker tails it)",
    "quantize": "quantize the base model to 4 or 8 bits at load (QLoRA)",
    "quantize_group_size": "quantization group size",
    "dtype": "cast the base weights at load (bf16, f16, f32)",
    "memory_limit_gb": "preflight against this many GB instead of the machine's free memory",
    "auto_fit": "change batch size / checkpointing / quantization / LoRA layers until the run fits",
    "progress": "console output: auto (bar on a terminal), bar, lines or none",
}


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="LoRA fine-tune a model on a folder of JSONL files")
    t.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    t.add_argument(
        "--data", required=True, help="folder with train.jsonl (+ valid.jsonl, test.jsonl)"
    )
    t.add_argument(
        "--test", action="store_true", help="report test loss and perplexity after training"
    )
    t.add_argument("--test-batches", type=int, default=-1, help="test batches (-1: all)")
    t.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint under --adapter-path, or from CHECKPOINT",
    )
    t.add_argument(
        "--no-compile", dest="compile", action="store_false", help="do not mx.compile the step"
    )
    for f in fields(TrainConfig):
        if f.name in _TRAIN_FLAGS:
            _add_field(t, f.name, _TRAIN_FLAGS[f.name])
    t.set_defaults(run=run_train, reports_blas=True)

    lo = sub.add_parser("lora", help="mlx-examples lora.py's command line (train, test, generate)")
    lo.add_argument(
        "--model",
        default=None,
        help="model folder (convert.py's weights.npz + params.json + tokenizer.model, or any "
        "we load; default: the embedded demo model)",
    )
    lo.add_argument("--num-tokens", "-n", type=int, default=100, help="how many tokens to generate")
    lo.add_argument(
        "--write-every", type=int, default=1, help="after how many tokens to print text"
    )
    lo.add_argument("--temp", type=float, default=0.8, help="sampling temperature")
    lo.add_argument("--prompt", "-p", default=None, help="prompt for generation")
    lo.add_argument("--train", action="store_true", help="do training")
    lo.add_argument("--data", default="data/", help="folder with {train, valid, test}.jsonl")
    lo.add_argument(
        "--lora-layers",
        type=int,
        default=16,
        help="number of layers to fine-tune (default 16, or all of a smaller model)",
    )
    lo.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint (what Ctrl-C leaves)",
    )
    lo.add_argument("--batch-size", type=int, default=4, help="minibatch size")
    lo.add_argument("--iters", type=int, default=1000, help="iterations to train for")
    lo.add_argument(
        "--val-batches",
        type=int,
        default=25,
        help="validation batches, -1 uses the entire validation set",
    )
    lo.add_argument("--learning-rate", type=float, default=1e-5, help="Adam learning rate")
    lo.add_argument("--steps-per-report", type=int, default=10, help="steps between loss reports")
    lo.add_argument("--steps-per-eval", type=int, default=200, help="steps between validations")
    lo.add_argument(
        "--resume-adapter-file", default=None, help="start training from these adapter weights"
    )
    lo.add_argument(
        "--adapter-file",
        default="adapters.npz",
        help="save/load path of the adapter (checkpoints go to the folder of the same name)",
    )
    lo.add_argument(
        "--save-every", type=int, default=100, help="save a checkpoint every N iterations"
    )
    lo.add_argument("--test", action="store_true", help="evaluate on the test set after training")
    lo.add_argument(
        "--test-batches", type=int, default=500, help="test batches, -1 uses the entire test set"
    )
    lo.add_argument("--seed", type=int, default=0, help="the PRNG seed")
    # Our fixes and additions (not in the seed):
    lo.add_argument("--mask-prompt", action="store_true", help="learn only the completion")
    lo.add_argument(
        "--completion-after", default=None, help="e.g. 'A:': where the completion starts"
    )
    lo.add_argument("--max-seq-len", type=int, default=2048)
    lo.add_argument("--grad-checkpoint", action="store_true")
    lo.add_argument(
        "--quantize",
        type=int,
        choices=[4, 8],
        default=None,
        help="QLoRA: quantize the base at load",
    )
    lo.add_argument("--auto-fit", action="store_true", help="pick settings that fit in memory")
    lo.add_argument("--memory-limit-gb", type=float, default=None)
    lo.add_argument("--events-jsonl", default=None)
    lo.set_defaults(run=run_lora, reports_blas=True)


def _add_field(p: argparse.ArgumentParser, name: str, help_text: str) -> None:
    flag = "--" + name.replace("_", "-")
    default = getattr(_DEFAULTS, name)
    if isinstance(default, bool):
        p.add_argument(flag, action="store_true", help=help_text)
    elif name == "targets":
        p.add_argument(
            flag,
            type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
            default=default,
            help=f"{help_text} (default: {','.join(default)})",
        )
    elif name == "quantize":
        p.add_argument(flag, type=int, choices=[4, 8], default=None, help=help_text)
    else:
        kind = type(default) if default is not None else str
        if name == "memory_limit_gb":
            kind = float
        p.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")


def _config_from(ns: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(ns, f.name) for f in fields(TrainConfig) if hasattr(ns, f.name)}
    return TrainConfig(**values)


def run_train(ns: argparse.Namespace) -> int:
    from mlx_core.demo import resolve_model_path
    from mlx_core.train.loop import train

    config = _config_from(ns)
    result = train(resolve_model_path(ns.model), ns.data, config)
    if ns.test:
        _report_test(result.model, ns.data, config, ns.test_batches)
    return 0


def _report_test(loaded, data: str, config: TrainConfig, test_batches: int) -> None:
    from mlx_core.data.batches import eval_batches
    from mlx_core.train.config import load_train_data
    from mlx_core.train.step import evaluate_loss

    print("Testing", flush=True)
    split = load_train_data(data, loaded.tokenizer, config, splits=("test",))
    if not split.test:
        raise FileNotFoundError(
            f"no test.jsonl in {data}: add one (same format as train.jsonl) or drop --test"
        )
    batches = eval_batches(split.test, config.batch_size, test_batches, config.max_seq_len)
    loss, ppl = evaluate_loss(loaded.model, batches)
    print(f"Test loss {loss:.3f}, Test ppl {ppl:.3f}.", flush=True)


def run_lora(ns: argparse.Namespace) -> int:
    from mlx_core.demo import resolve_model_path
    from mlx_core.lora.formats import load_adapter
    from mlx_core.lora.layers import apply_lora, load_adapter_into
    from mlx_core.train.loop import train
    from mlx_core.weights import load_model

    adapter_file = Path(ns.adapter_file)
    config = TrainConfig(
        iters=ns.iters,
        batch_size=ns.batch_size,
        learning_rate=ns.learning_rate,
        lora_layers=ns.lora_layers,
        val_batches=ns.val_batches,
        steps_per_report=ns.steps_per_report,
        steps_per_eval=ns.steps_per_eval,
        save_every=ns.save_every,
        seed=ns.seed,
        adapter_path=str(adapter_file.with_suffix("")),
        adapter_file=str(adapter_file),
        init_adapter=ns.resume_adapter_file,
        resume=ns.resume,
        mask_prompt=ns.mask_prompt,
        completion_after=ns.completion_after,
        max_seq_len=ns.max_seq_len,
        grad_checkpoint=ns.grad_checkpoint,
        quantize=ns.quantize,
        auto_fit=ns.auto_fit,
        memory_limit_gb=ns.memory_limit_gb,
        events_jsonl=ns.events_jsonl,
    )
    if not (ns.train or ns.test or ns.prompt is not None):
        print(
            "loraforge lora: nothing to do: pass --train, --test and/or --prompt TEXT",
            file=sys.stderr,
        )
        return 2

    if ns.train:
        result = train(resolve_model_path(ns.model), ns.data, config)
        loaded = result.model  # the trained LoRA layers are still applied
    else:
        if not adapter_file.exists():
            # FileNotFoundError is one of the engine's user errors: printed as one line, exit 2.
            raise FileNotFoundError(
                f"{adapter_file}: no adapter file; train one first with "
                "--train, or pass --adapter-file PATH to an existing one"
            )
        print("Loading pretrained model", flush=True)
        loaded = load_model(resolve_model_path(ns.model))
        adapter = load_adapter(adapter_file, loaded.args)
        adapter.check_fits(loaded.args)
        print(f"Loading adapters from {adapter_file}", flush=True)
        apply_lora(loaded.model, adapter.rank, adapter.scale, adapter.targets, adapter.layers)
        load_adapter_into(loaded.model, adapter)

    if ns.test:
        _report_test(loaded, ns.data, config, ns.test_batches)

    if ns.prompt is not None:
        _generate(loaded, ns)
    return 0


def _generate(loaded, ns: argparse.Namespace) -> None:
    from mlx_core.engine import Engine
    from mlx_core.sampling import SamplingParams

    print("Generating", flush=True)
    # The engine runs the model with the trained LoRA layers still in place: the adapter's exact
    # math, without saving and reloading it into adapter slots.
    loaded.model.eval()
    engine = Engine(loaded.model, loaded.tokenizer)
    params = SamplingParams(max_tokens=ns.num_tokens, temperature=ns.temp, seed=ns.seed)
    print(ns.prompt, end="", flush=True)
    pending, n = [], 0
    for out in engine.generate(loaded.tokenizer.encode(ns.prompt), params):
        pending.append(out.text)
        n += len(out.tokens)
        if n >= ns.write_every or out.finish_reason:
            print("".join(pending), end="", flush=True)
            pending, n = [], 0
    print(flush=True)
