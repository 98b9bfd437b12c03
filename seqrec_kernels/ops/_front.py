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


def takes(backend, first, *others) -> bool:
    """Whether a call of `backend` ('cpp' or 'cuda': the caller compares) may take the front:
    plain tensors (others: tensors or None) on the backend's device, a plain eager call, and
    value_checks not forced on (value_checks(True) reads device values at once: the general path)."""
    if not (_HAS_FRONT and type(first) in _PLAIN):
        return False
    for other in others:
        if other is not None and type(other) not in _PLAIN:
            return False
    on_device = first.is_cpu if backend == "cpp" else first.is_cuda and _CUDA_KERNELS  # resolve()'s rule
    return on_device and _checks._value_checks is not True and _library._eager_possible(first)


def value_checks(first: torch.Tensor) -> tuple[bool, bool]:
    """(values_on_host, check_values) for the front: whether index values on first's device may
    be read on the host (else flags on the device), and whether they are checked at all."""
    return _checks.values_on_host(first), _checks._value_checks is None and _checks.values_checkable()
