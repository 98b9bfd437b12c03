"""When a public call takes the extension's C++ front (csrc/front.cpp), and what it hands it.

A call of fused_attention, fused_attention_varlen, sampled_softmax_loss or full_softmax_loss on
backend 'cpp' (CPU tensors) or 'cuda' (CUDA tensors) is a plain eager call when nothing traces
or intercepts it (ops/_library.py's _eager_possible) and its tensors are plain: the front then
runs it in C++ (checks, sequence rows, index value checks, casts, one autograd node over the
extension's ops), or declines it, and the public function takes its general path, which raises
the error naming the argument. Every line here runs on every such call: keep it lean
(docs/host-path.md has the costs).
"""

from __future__ import annotations

import torch

from .. import _checks
from ..backends import EXTENSION_ERROR, extension_has_cuda_kernels
from . import _library

_PLAIN = (torch.Tensor, torch.nn.Parameter)
REAL = (float, int)  # what check_real takes (bool is neither: type(True) is bool)
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}  # csrc/front.cpp's Reduction

_HAS_FRONT = EXTENSION_ERROR is None
_CUDA_KERNELS = _HAS_FRONT and extension_has_cuda_kernels()
if _HAS_FRONT:
    # The C++ functions themselves (OpOverload._op): one Python frame less per call.
    FUSED_ATTENTION = torch.ops.seqrec._fused_attention_front.default._op
    FUSED_ATTENTION_VARLEN = torch.ops.seqrec._fused_attention_varlen_front.default._op
    SAMPLED_SOFTMAX_LOSS = torch.ops.seqrec._sampled_softmax_loss_front.default._op
    FULL_SOFTMAX_LOSS = torch.ops.seqrec._full_softmax_loss_front.default._op


def value_checks(backend, first, *others) -> tuple[bool, bool] | None:
    """None when a call of `backend` ('cpp' or 'cuda': the caller compares) cannot take the front,
    else how the front checks index values: (values_on_host, check_values). It takes plain
    tensors (others: tensors or None) on the backend's device in a plain eager call, unless
    value_checks(True) is on (device values read at once: the general path). Index values on
    the host are read there (else flagged on the device) and checked as _checks.value_check_mode
    says (CPU values also while a CUDA graph is captured: reading them is no sync, and torch.cuda's
    capture query costs microseconds per call). One function: each Python call here costs ~1 us."""
    if not (_HAS_FRONT and type(first) in _PLAIN):
        return None
    for other in others:
        if other is not None and type(other) not in _PLAIN:
            return None
    on_cpu = first.is_cpu
    if not (on_cpu if backend == "cpp" else first.is_cuda and _CUDA_KERNELS):  # resolve()'s rule
        return None
    checks = _checks._value_checks
    if checks is True or not _library._eager_possible(first):
        return None
    return _checks.values_on_host(first), checks is None and (on_cpu or _checks.values_checkable())
