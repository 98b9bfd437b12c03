"""The backends every kernel test runs: `triton` (in the interpreter on CPU) and the
extension's: `cpp` (its C++ CPU implementation, on CPU tensors) and `cuda` (its CUDA
kernels, on a GPU).

`make test` (and CI) sets SEQREC_REQUIRE_EXTENSION=1, so a missing extension fails the
run instead of skipping the `cuda` cases; a bare `pytest` skips them.
"""

import os

import pytest
import torch

from seqrec_kernels.backends import EXTENSION_ERROR, extension_has_cuda_kernels

if EXTENSION_ERROR is not None and os.environ.get("SEQREC_REQUIRE_EXTENSION") == "1":
    raise RuntimeError(f"SEQREC_REQUIRE_EXTENSION=1 but {EXTENSION_ERROR}")

CPP = pytest.param("cpp", marks=pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR)))
KERNELS = ["triton", CPP]
ALL = ["reference", *KERNELS]

# On a GPU, `cuda` needs the extension built with its CUDA kernels.
GPU_CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not extension_has_cuda_kernels(), reason="seqrec_kernels._C has no CUDA kernels")
)
GPU_ALL = ["reference", "triton", GPU_CUDA]


def extension_backend(device) -> str:
    """The extension's backend for tensors on `device`: its CUDA kernels, or its C++ CPU implementation."""
    return "cuda" if torch.device(device).type == "cuda" else "cpp"


def op(name: str, backend: str):
    """The torch op `seqrec::<name>_<backend>`; `cpp` runs the extension's `*_cuda` ops (their CPU kernels)."""
    return getattr(torch.ops.seqrec, f"{name}_{'cuda' if backend == 'cpp' else backend}")
