"""The backends every kernel test runs: `triton` (in the interpreter on CPU) and `cuda`
(the extension's C++ CPU implementation on CPU, its CUDA kernels on a GPU).

`make test` (and CI) sets SEQREC_REQUIRE_EXTENSION=1, so a missing extension fails the
run instead of skipping the `cuda` cases; a bare `pytest` skips them.
"""

import os

import pytest

from seqrec_kernels.backends import EXTENSION_ERROR, extension_has_cuda_kernels

if EXTENSION_ERROR is not None and os.environ.get("SEQREC_REQUIRE_EXTENSION") == "1":
    raise RuntimeError(f"SEQREC_REQUIRE_EXTENSION=1 but {EXTENSION_ERROR}")

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR)))
KERNELS = ["triton", CUDA]
ALL = ["reference", *KERNELS]

# On a GPU, `cuda` needs the extension built with its CUDA kernels.
GPU_CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not extension_has_cuda_kernels(), reason="seqrec_kernels._C has no CUDA kernels")
)
GPU_ALL = ["reference", "triton", GPU_CUDA]
