"""The paper's analyses (spec §7) that need no model: n-gram conditional entropy of text tokens and image
codes over a preprocessed dataset (``entropy``). The gradient conflict per layer lives with training
(``training/gradient_conflict.py``), which measures it during a run as well."""
