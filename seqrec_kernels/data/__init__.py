"""Data: negative samplers and packed batches (readers, splits and batching come with the
SASRec trainer)."""

from .packed import PackedBatch
from .samplers import PopularitySampler, UniformSampler, UnseenSampler, in_batch_negatives

__all__ = ["PackedBatch", "PopularitySampler", "UniformSampler", "UnseenSampler", "in_batch_negatives"]
