"""Batch transforms on the model's device: per-sample random parameters, no loop over images."""
