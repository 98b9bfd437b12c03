"""seqrec_kernels: fast, exact kernels for sequential recommendation."""

from . import nn
from ._checks import check, value_checks
from .backends import Backend, available
from .ops.attention import fused_attention, fused_attention_varlen
from .ops.retrieval import target_ranks, topk_items
from .ops.softmax_loss import full_softmax_loss, sampled_softmax_loss

__all__ = [
    "Backend",
    "available",
    "check",
    "full_softmax_loss",
    "fused_attention",
    "fused_attention_varlen",
    "nn",
    "sampled_softmax_loss",
    "target_ranks",
    "topk_items",
    "value_checks",
]
__version__ = "0.1.0"
