"""Data: synthetic packed batches for demos, tests and benchmarks (indexed datasets come next)."""
