"""loraforge engine: Mistral on MLX, LoRA training and batched generation. No HTTP, no database."""
