"""Generation with Uni-X models (spec §6): logits processing (``sampling``), the loops on the HF model
with its per-modality KV cache (``generate``), model loading from HF or Megatron checkpoints
(``loading``) and the VQGAN side of images (``images``)."""
