"""Fine-tune jobs: the queue (`queue`), job -> TrainConfig (`spec`), the worker (`worker`), events."""
