"""Triton kernels and their launchers. Importing this package does not import Triton
(optional on CPU); `implementation` defers the import to the first call."""

import importlib


def implementation(module: str, function: str):
    """A function that runs `seqrec_kernels.triton.<module>.<function>`, importing it on first use."""

    def run(*args, **kwargs):
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(*args, **kwargs)

    run.__name__ = f"triton_{module}_{function}"
    return run
