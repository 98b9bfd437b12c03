"""Build script: the package plus the C++/CUDA extension `seqrec_kernels._C` (the `cuda` backend).

    pip install --no-build-isolation -e .

With a CPU-only torch (or SEQREC_SKIP_CUDA=1) the extension holds the op schemas, input
checks and CPU implementations (CppExtension). With a CUDA torch and nvcc it adds the
kernels of csrc/cuda/*.cu (CUDAExtension) for the architectures in SEQREC_CUDA_ARCHS
(default "8.0;9.0": A100 and H100/H200). SEQREC_SKIP_EXTENSION=1 builds the pure-Python
package only (reference and Triton backends).
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _extension_modules():
    if _flag("SEQREC_SKIP_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    host_sources = [str(CSRC / "ops.cpp"), str(CSRC / "ops_cpu.cpp"), str(CSRC / "front.cpp")]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("SEQREC_SKIP_CUDA")
    if with_cuda:
        archs = os.environ.get("SEQREC_CUDA_ARCHS", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what CUDAExtension compiles for
        extension = CUDAExtension(
            "seqrec_kernels._C",
            host_sources + [str(CSRC / "ops_cuda.cpp")] + sorted(str(p) for p in (CSRC / "cuda").glob("*.cu")),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        extension = CppExtension("seqrec_kernels._C", host_sources, extra_compile_args={"cxx": cxx_flags})
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


os.chdir(ROOT)  # relative source paths, as setuptools wants them
ext_modules, cmdclass = _extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
