"""seqrec_kernels: fast, exact kernels for sequential recommendation."""

from .backends import Backend, available
from .ops.attention import fused_attention, fused_attention_varlen

__all__ = ["Backend", "available", "fused_attention", "fused_attention_varlen"]
__version__ = "0.1.0"
