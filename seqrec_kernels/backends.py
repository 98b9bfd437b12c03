"""Which implementation runs an op: the `Backend` enum, availability and selection.

Every op has one dispatcher that asks `resolve()` for a concrete backend; anything this
module cannot honour raises, it never falls back to another path silently.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import logging
import os

import torch

from ._checks import check_kernel_dtype

logger = logging.getLogger("seqrec_kernels")


class Backend(str, enum.Enum):
    """Where each backend runs: `reference` (PyTorch, any device), `triton` (CUDA tensors; CPU
    tensors in Triton's interpreter), `cuda` (the extension's CUDA kernels, CUDA tensors),
    `cpp` (the extension's C++ CPU implementation, CPU tensors: the test double of the CUDA
    glue, same ops and checks, scalar loops)."""

    AUTO = "auto"
    REFERENCE = "reference"
    TRITON = "triton"
    CUDA = "cuda"
    CPP = "cpp"

    @classmethod
    def parse(cls, value: str | Backend) -> Backend:
        if isinstance(value, Backend):
            return value
        if isinstance(value, str):
            parsed = _BY_NAME.get(value.lower())  # a dict lookup: Enum(value) costs microseconds per call
            if parsed is not None:
                return parsed
        choices = ", ".join(repr(b.value) for b in cls)
        raise ValueError(f"backend: expected one of {choices}, got {value!r}")


_BY_NAME = {backend.value: backend for backend in Backend}


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton decides between its interpreter and its compiler when a kernel is decorated, that
# is when this package is imported: setting TRITON_INTERPRET later cannot make our kernels
# run on CPU tensors (the variable must be set before `import seqrec_kernels`).
TRITON_INTERPRETED_AT_IMPORT = triton_interpreter_enabled()


def triton_interpreted() -> bool:
    """Whether our Triton kernels run in the interpreter now: decorated under it (at import) and
    not switched off since. Where they were compiled it is False without reading the environment
    (the launchers' configurations ask on every call). Switched off after an interpreted import,
    the kernels still interpret (Triton decided at import) but CPU tensors are refused."""
    return TRITON_INTERPRETED_AT_IMPORT and triton_interpreter_enabled()


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # without importing it


def _load_extension() -> str | None:
    """Imports seqrec_kernels._C (which registers the `cuda` backend's ops); None on
    success, else why it is missing, so the package works without it."""
    try:
        from . import _C  # noqa: F401
    except ImportError as error:
        build = "pip install --no-build-isolation -e ."
        return f"the seqrec_kernels._C extension is not built ({error}); build it with `{build}`"
    return None


EXTENSION_ERROR = _load_extension()


def cpp_op(qualified_name: str):
    """The op `seqrec::<name>` (its default overload), e.g. cpp_op("seqrec::attention_fwd_cuda"),
    one that seqrec_kernels._C defines."""
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


# Fixed once _C is imported (asked on every call of a kernel backend on CUDA tensors).
_EXTENSION_HAS_CUDA_KERNELS = EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "seqrec::attention_fwd_cuda", "CUDA"
)


def extension_has_cuda_kernels() -> bool:
    """Whether seqrec_kernels._C was built with its CUDA kernels (not only the C++ CPU part)."""
    return _EXTENSION_HAS_CUDA_KERNELS


def _unavailable_reason(backend: Backend, device: torch.device) -> str | None:
    """None when `backend` can run on `device`, else a sentence saying why not."""
    if backend is Backend.REFERENCE:
        return None
    if backend is Backend.TRITON:
        if not TRITON_INSTALLED:
            return "the 'triton' package is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return (
            f"it runs on CUDA tensors (or on CPU tensors when TRITON_INTERPRET=1 is set before "
            f"seqrec_kernels is imported), got tensors on {device}"
        )
    if backend in (Backend.CUDA, Backend.CPP) and EXTENSION_ERROR is not None:
        return EXTENSION_ERROR
    if backend is Backend.CPP:
        if device.type == "cpu":
            return None
        return f"it is the extension's C++ CPU implementation, for CPU tensors (got tensors on {device}; use 'cuda')"
    if backend is Backend.CUDA:
        if device.type == "cpu":
            return "it runs CUDA kernels on CUDA tensors; on CPU tensors the extension's C++ implementation is 'cpp'"
        if device.type == "cuda" and extension_has_cuda_kernels():
            return None
        return (
            f"seqrec_kernels._C was built without CUDA kernels (CPU torch, no nvcc or SEQREC_SKIP_CUDA=1), "
            f"got tensors on {device}"
        )
    raise AssertionError(f"unhandled backend {backend}")


# The extension first: on the H200 (benchmarks/results/*-NVIDIA-H200.md) its kernels were
# faster forward+backward at every attention shape and three of the four loss shapes, and its
# eager host path costs a third (forward) to a half (forward+backward) of Triton's
# (docs/host-path.md). Triton takes the ops the extension lacks (retrieval).
AUTO_GPU_ORDER = (Backend.CUDA, Backend.TRITON)
# The public ops the extension implements; `auto` skips it for the others.
EXTENSION_OPS = frozenset({"fused_attention", "fused_attention_varlen", "sampled_softmax_loss", "full_softmax_loss"})


def available(device: torch.device | str = "cpu") -> list[Backend]:
    """The concrete backends that can run on tensors of `device`."""
    device = torch.device(device)
    concrete = (Backend.REFERENCE, Backend.TRITON, Backend.CUDA, Backend.CPP)
    return [b for b in concrete if _unavailable_reason(b, device) is None]


@functools.cache  # what is available on CUDA tensors is fixed at import; `auto` asks on every call
def _auto_on_cuda(op_name: str) -> Backend:
    """`auto`'s backend for op_name on CUDA tensors: the first available of AUTO_GPU_ORDER that
    implements it; a ValueError saying why if none is."""
    device = torch.device("cuda")
    order = [b for b in AUTO_GPU_ORDER if b is not Backend.CUDA or op_name in EXTENSION_OPS]
    reasons = {b: _unavailable_reason(b, device) for b in order}
    chosen = next((b for b in order if reasons[b] is None), None)
    if chosen is None:
        why = "; ".join(f"{b.value!r}: {reason}" for b, reason in reasons.items())
        raise ValueError(f"backend: 'auto' has no backend for {op_name} on CUDA tensors ({why})")
    return chosen


def resolve(backend: str | Backend, device: torch.device, op_name: str) -> Backend:
    """The concrete backend that runs `op_name` on `device`; raises ValueError if none can.

    `auto` picks the reference on CPU and, on CUDA, the first available backend of
    AUTO_GPU_ORDER that implements `op_name`, deterministically.
    """
    requested = Backend.parse(backend)
    if requested is Backend.AUTO:
        chosen = Backend.REFERENCE
        if device.type == "cuda":  # Dynamo would warn about the cache (it traces the function itself)
            chosen = (_auto_on_cuda.__wrapped__ if torch.compiler.is_compiling() else _auto_on_cuda)(op_name)
        if not torch.compiler.is_compiling():
            logger.debug("%s: backend 'auto' picked %r on %s", op_name, chosen.value, device)
        return chosen
    reason = _unavailable_reason(requested, device)
    if reason is not None:
        raise ValueError(f"backend: {requested.value!r} is not available for {op_name}: {reason}")
    return requested


def resolve_for(backend: str | Backend, op_name: str, name: str, tensor: torch.Tensor) -> Backend:
    """resolve() on the device of `tensor` (the argument `name` of `op_name`), whose dtype
    the chosen backend must take (kernel backends: no float64)."""
    chosen = resolve(backend, tensor.device, op_name)
    check_kernel_dtype(chosen.value, name, tensor)
    return chosen
