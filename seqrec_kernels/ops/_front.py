"""When a public call takes the extension's C++ front (csrc/front.cpp), and what it hands it.

A call of fused_attention, fused_attention_varlen, sampled_softmax_loss or full_softmax_loss on
backend 'cpp' (CPU tensors), 'cuda' (CUDA tensors), 'triton' (CUDA tensors; CPU tensors under
Triton's interpreter) or 'auto' on CUDA tensors (the backend it resolves to) is a plain eager
call when nothing traces or intercepts it (ops/_library.py's _eager_possible) and its tensors
are plain: the front then runs it in C++ (checks, sequence rows, index value checks, casts, one
autograd node over the backend's kernel ops: the extension's, or the Triton launchers that the
custom ops seqrec::*_triton run), or declines it, and the public function takes its general
path, which raises the error naming the argument. Every line here runs on every such call:
keep it lean (docs/host-path.md has the costs).
"""

from __future__ import annotations

import torch

from .. import _checks, backends
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


def front_checks(backend, op_name: str, first, *others) -> tuple[bool, bool, bool] | None:
    """None when a call of `backend` cannot take the front, else how the front runs it:
    (values_on_host, check_values, on_triton). It takes plain tensors (others: tensors or None)
    on a device the backend runs on, in a plain eager call, unless value_checks(True) is on
    (device values read at once: the general path). Index values on the host are read there
    (else flagged on the device) and checked as _checks.value_check_mode says (CPU values also
    while a CUDA graph is captured: reading them is no sync, and torch.cuda's capture query costs
    microseconds per call). One function: each Python call here costs ~1 us."""
    if not (_HAS_FRONT and (backend == "cpp" or backend == "cuda" or backend == "triton" or backend == "auto")):
        return None
    if type(first) not in _PLAIN:
        return None
    for other in others:
        if other is not None and type(other) not in _PLAIN:
            return None
    on_cpu = first.is_cpu
    if backend == "auto" and not on_cpu:  # on a CPU, `auto` is the reference: no front
        try:
            backend = backends.resolve(backend, first.device, op_name)
        except ValueError:  # the general path raises it
            return None
    if backend == "cpp":
        runs = on_cpu
    elif backend == "cuda":
        runs = first.is_cuda and _CUDA_KERNELS
    elif backend == "triton":
        runs = backends._unavailable_reason(backends.Backend.TRITON, first.device) is None
    else:
        return None
    checks = _checks._value_checks
    if not runs or checks is True or not _library._eager_possible(first):
        return None
    values_checked = checks is None and (on_cpu or _checks.values_checkable())
    return _checks.values_on_host(first), values_checked, backend == "triton"
