"""The paper's analyses (spec §7): n-gram conditional entropy of text tokens and image codes over a
preprocessed dataset (``entropy``), and the gradient conflict between text and multimodal data per
layer of a checkpoint (``gradients``)."""
