"""megatron-unix: Uni-X unified multimodal pretraining on Megatron-Core."""

__version__ = "0.1.0"
