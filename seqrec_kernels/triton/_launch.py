"""Launching compiled Triton kernels at the cost of a dictionary lookup.

`kernel[grid](*args, **meta)` runs Triton's generic launch path on every call: it binds the
arguments, specializes each one, builds a cache key (a string of the options), looks the
kernel up, checks its globals, then launches. `launch_kernel(kernel, grid, *args, **meta)` does that
once per specialization: the first call goes through the generic path, which compiles and
launches the kernel and returns the CompiledKernel; later calls with the same specialization
call the CompiledKernel's launcher directly, as JITFunction.run itself does at its end.

The specialization key is what Triton specializes a kernel on, or finer (tests/test_host_path.py
checks that it selects the kernel Triton selects): per tensor its dtype and whether its address
is 16-byte aligned; per int whether it is 1, divisible by 16 and its integer width; per other
argument its type (floats and bools are not specialized on their values; None is); plus the
constexprs and launch options in `meta`, and the device. Under Triton's interpreter, with a
launch hook installed (profilers), or for a kernel that Triton returns no CompiledKernel for,
every call takes the generic path.
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime import driver

from ..backends import TRITON_INTERPRETED_AT_IMPORT

# (kernel, device, key) -> (compiled kernel, the values of the parameters after the positional
# arguments, in signature order: the constexprs as Triton passes them to the launcher).
_compiled: dict[tuple, tuple] = {}


def _active(hook) -> bool:
    """Whether a launch hook is installed: Triton 3.6 has None or a function, 3.9 a HookChain
    (empty when none is installed)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def specialization_key(args, meta) -> tuple:
    """The launch's key in the compiled-kernel cache (without the kernel and device): what
    Triton specializes each argument on, or finer; one comprehension (a function call per
    argument would double its cost)."""
    arguments = tuple(
        [
            (a.dtype, not a.data_ptr() % 16)
            if isinstance(a, torch.Tensor)
            else (a == 1, not a % 16, -(2**31) <= a < 2**31, a < 2**63)
            if type(a) is int
            else type(a)  # floats and bools by type only; None
            for a in args
        ]
    )
    return arguments, tuple(meta.items())


def launch_kernel(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta): args are the kernel's leading parameters, positionally;
    meta its constexprs (by name) and launch options (num_warps, num_stages, maxnreg)."""
    # The generic path under the interpreter, with a launch hook, or where a test or tool wrapped
    # JITFunction.run (a compile-only driver, a launch counter): it must see every launch.
    if (
        TRITON_INTERPRETED_AT_IMPORT
        or _active(knobs.runtime.launch_enter_hook)
        or _active(knobs.runtime.launch_exit_hook)
        or type(kernel).run.__module__ != "triton.runtime.jit"
    ):
        return kernel[grid](*args, **meta)
    device = driver.active.get_current_device()
    cache_key = (id(kernel), device, specialization_key(args, meta))  # kernels live as long as their modules
    entry = _compiled.get(cache_key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)  # compiles (first time) and launches
        if not hasattr(compiled, "packed_metadata"):  # not a CompiledKernel (an asynchronous compile)
            return compiled
        names = kernel.arg_names[len(args) :]
        defaults = {p.name: p.default for p in kernel.params}
        _compiled[cache_key] = (compiled, tuple(meta[n] if n in meta else defaults[n] for n in names))
        return compiled
    compiled, constexprs = entry
    grid = tuple(grid) + (1,) * (3 - len(grid))
    stream = driver.active.get_current_stream(device)
    compiled.run(
        grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
        *args, *constexprs,
    )  # fmt: skip
    return compiled
