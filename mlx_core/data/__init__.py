"""Training data: the JSONL formats (`formats`) and tokenized, masked, packed batches (`batches`)."""
