"""Data: negative samplers (readers, splits and batching come with the SASRec trainer)."""

from .samplers import PopularitySampler, UniformSampler, in_batch_negatives

__all__ = ["PopularitySampler", "UniformSampler", "in_batch_negatives"]
