"""loraforge service: the OpenAI-compatible Litestar app, adapter registry and fine-tune jobs."""
