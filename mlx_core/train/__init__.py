"""LoRA fine-tuning: config, loop, step, optimizers, checkpoints, memory preflight, events.

`python -m mlx_core.train SPEC.json` runs one fine-tune (see `__main__`)."""
