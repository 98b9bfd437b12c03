"""Build script. The package is pure Python today (reference + Triton backends); the
C++/CUDA extension `seqrec_kernels._C` joins it with the CUDA backend.

    pip install --no-build-isolation -e .
"""

from setuptools import setup

setup()
