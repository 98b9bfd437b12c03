"""Triton kernels and their launchers. Importing this package does not import Triton
(optional on CPU); `implementation` defers the import to the first call."""

import importlib


def implementation(module: str, function: str):
    """A function that runs `seqrec_kernels.triton.<module>.<function>`, importing it on first use."""

    imported = []  # the module, once imported: no import machinery per call

    def run(*args, **kwargs):
        if not imported:
            imported.append(importlib.import_module(f"{__name__}.{module}"))
        return getattr(imported[0], function)(*args, **kwargs)  # looked up per call: tests replace it

    run.__name__ = f"triton_{module}_{function}"
    return run
