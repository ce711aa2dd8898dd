"""Checkpoint conversion between Megatron and the Hugging Face reference format (spec §5)."""
