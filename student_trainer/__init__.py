"""The student trainer: soft-target sources, KD losses (one method per file),
and the training loop that combines them."""
