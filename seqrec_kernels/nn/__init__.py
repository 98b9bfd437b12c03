"""Drop-in modules for existing training code: `MultiheadAttention` (torch's module on
fused_attention), `replace_attention` (swaps it into a model) and the loss modules."""

from .attention import MultiheadAttention, replace_attention
from .losses import FullSoftmaxLoss, SampledSoftmaxLoss

__all__ = ["FullSoftmaxLoss", "MultiheadAttention", "SampledSoftmaxLoss", "replace_attention"]
