"""Data: the vocabulary layout, tokenizers, sample layouts, jsonl preprocessing, the indexed dataset on disk
and the packed Megatron dataset over it (plus synthetic batches for demos, tests and benchmarks)."""
