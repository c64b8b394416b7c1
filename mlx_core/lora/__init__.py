"""LoRA: training layers (`layers`), serving slots (`slots`), file formats (`formats`), fusing (`fuse`)."""
