"""Launching compiled Triton kernels at the cost of a dictionary lookup.

`kernel[grid](*args, **meta)` runs Triton's generic launch path on every call: it binds the
arguments, specializes each one, builds a cache key (a string of the options), looks the
kernel up, checks its globals, then launches. `launch_kernel(kernel, grid, *args, **meta)` does that
once per specialization: the first call goes through the generic path, which compiles and
launches the kernel and returns the CompiledKernel; later calls with the same specialization
call the CompiledKernel's launcher directly, as JITFunction.run itself does at its end.

The key is finer than what Triton specializes a kernel on (tests/test_host_path.py checks that
it selects the kernel Triton selects): per tensor its dtype and whether its address is 16-byte
aligned (Triton: the same), every other argument by value (Triton: an int by whether it is 1,
divisible by 16 and its width; a float or bool by type), plus the constexprs and launch options
in `meta`, and the device. Keying sizes and strides by value costs one C-level tuple instead of
a Python test per argument; they repeat from call to call, and the cache is bounded. Under Triton's interpreter, with a
launch hook installed (profilers), where a test or tool wrapped JITFunction.run, or with
SEQREC_GENERIC_TRITON_LAUNCH=1 in the environment at import (to rule the cache out), every call
takes the generic path.

Inside `traced_launches()` (a launcher run on the fake tensors of a graph being traced, see
ops/_library.py) a launch is not run but recorded: it goes through torch.library.wrap_triton,
so that the traced graph holds the kernel call itself.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import threading

import torch
import triton
from triton import knobs
from triton.runtime import driver

from ..backends import TRITON_INTERPRETED_AT_IMPORT

GENERIC_ONLY = TRITON_INTERPRETED_AT_IMPORT or os.environ.get("SEQREC_GENERIC_TRITON_LAUNCH", "0") not in ("", "0")

MAX_CACHED = 4096
# (kernel, device, key) -> (compiled kernel, the values of the parameters after the positional
# arguments, in signature order: the constexprs as Triton passes them to the launcher).
_compiled: dict[tuple, tuple] = {}


def _active(hook) -> bool:
    """Whether a launch hook is installed: Triton 3.6 has None or a function, 3.9 a HookChain
    (empty when none is installed)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _getter(positions: list[int]):
    """args -> the tuple of args at `positions`, at C speed."""
    if len(positions) == 1:
        return lambda args: (args[positions[0]],)
    return operator.itemgetter(*positions) if positions else lambda args: ()


# (kernel, number of arguments) -> getters of the call site's tensor (or None) arguments and of
# the others, from the first call: a launcher passes the same kinds at the same places.
_argument_split: dict[tuple[int, int], tuple] = {}


def specialization_key(args, meta, kernel_id: int = 0) -> tuple:
    """The launch's key in the compiled-kernel cache (without the kernel and device), finer
    than Triton's specialization: per tensor its dtype and 16-byte alignment, every other
    argument by value (ints, floats, bools, None: sizes and strides repeat from call to call).
    An argument of another kind than at the first call is keyed by value, which stays exact."""
    split = _argument_split.get((kernel_id, len(args)))
    if split is None:
        tensors = [i for i, a in enumerate(args) if a is None or isinstance(a, torch.Tensor)]
        split = _getter(tensors), _getter([i for i in range(len(args)) if i not in tensors])
        _argument_split[(kernel_id, len(args))] = split
    tensors, others = split
    pointers = tuple([(t.dtype, not t.data_ptr() % 16) if isinstance(t, torch.Tensor) else t for t in tensors(args)])
    return pointers, others(args), tuple(meta.items())


def cdiv(x, y):
    """triton.cdiv for the launchers' host code, without Triton's constexpr-function wrapper
    (about 3 us a call in Triton 3.9)."""
    return (x + (y - 1)) // y


def next_power_of_2(n):
    """triton.next_power_of_2 for the launchers' host code, without its wrapper: the smallest
    power of 2 >= n (Triton's own for n < 1 and traced, symbolic sizes)."""
    return 1 << (n - 1).bit_length() if type(n) is int and n >= 1 else triton.next_power_of_2(n)


_state = threading.local()  # .traced: launches are recorded into a graph being traced


@contextlib.contextmanager
def traced_launches():
    """Inside the block, launch_kernel records each launch into the graph being traced
    (torch.library.wrap_triton) instead of running it: for launchers run on traced tensors."""
    previous = getattr(_state, "traced", False)
    _state.traced = True
    try:
        yield
    finally:
        _state.traced = previous


LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


@functools.cache
def _with_options(kernel, num_warps=4, num_stages=3, maxnreg=None):
    """`kernel` as a one-config autotuner that carries its launch options (Triton's defaults
    where not given): torch's kernel wrapper launches a Config's options, whereas `maxnreg`
    given as a keyword would reach torch's graph as if it were a kernel argument."""
    config = triton.Config({}, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)
    return triton.autotune([config], key=[])(kernel)


def _record_launch(kernel, grid, args, meta):
    """kernel[grid](*args, **meta) recorded into the graph being traced."""
    options = {name: meta[name] for name in LAUNCH_OPTIONS if name in meta}
    constexprs = {name: value for name, value in meta.items() if name not in options}
    return torch.library.wrap_triton(_with_options(kernel, **options))[grid](*args, **constexprs)


def _generic_only(kernel) -> bool:
    """Whether launches of `kernel` must take Triton's generic path: under the interpreter, with
    a launch hook, or where a test or tool wrapped JITFunction.run (a compile-only driver, a
    launch counter): it must see every launch."""
    return (
        GENERIC_ONLY
        or _active(knobs.runtime.launch_enter_hook)
        or _active(knobs.runtime.launch_exit_hook)
        or type(kernel).run.__module__ != "triton.runtime.jit"
    )


def _is_compiled(launched) -> bool:
    """Whether what Triton's launch returned is a CompiledKernel (not an asynchronous compile)."""
    return hasattr(launched, "packed_metadata")


def _constexpr_values(kernel, num_args: int, meta: dict) -> tuple:
    """The values of the kernel's parameters after its num_args positional arguments, in
    signature order: the constexprs as Triton passes them to the launcher."""
    defaults = {p.name: p.default for p in kernel.params}
    return tuple(meta[n] if n in meta else defaults[n] for n in kernel.arg_names[num_args:])


class BoundLaunch:
    """One launch of `kernel` whose grid, trailing scalar arguments (sizes, strides, ...) and
    constexprs and launch options are fixed: `launch(*tensors)` is launch_kernel(kernel, grid,
    *tensors, *scalars, **meta) at the cost of a key of the tensors alone (dtype and 16-byte
    alignment of each, as Triton specializes them) and a dictionary lookup. Part of a launch
    plan (`cached_plan`), which is keyed by everything the scalars and meta derive from."""

    __slots__ = ("kernel", "grid", "scalars", "meta", "_grid3", "_compiled")

    def __init__(self, kernel, grid, scalars, meta):
        self.kernel, self.grid, self.scalars, self.meta = kernel, grid, tuple(scalars), meta
        self._grid3 = tuple(grid) + (1,) * (3 - len(grid))
        self._compiled: dict[tuple, tuple] = {}  # (device, tensors' key) -> (compiled kernel, constexprs)

    def __call__(self, *tensors):
        if getattr(_state, "traced", False) or _generic_only(self.kernel):
            return launch_kernel(self.kernel, self.grid, *tensors, *self.scalars, **self.meta)
        device = driver.active.get_current_device()
        key = (device, tuple([None if t is None else (t.dtype, not t.data_ptr() % 16) for t in tensors]))
        entry = self._compiled.get(key)
        if entry is None:
            compiled = launch_kernel(self.kernel, self.grid, *tensors, *self.scalars, **self.meta)
            if _is_compiled(compiled):
                num_args = len(tensors) + len(self.scalars)
                self._compiled[key] = (compiled, _constexpr_values(self.kernel, num_args, self.meta))
            return compiled
        compiled, constexprs = entry
        x, y, z = self._grid3
        compiled.run(
            x, y, z, driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata,
            None, None, None, *tensors, *self.scalars, *constexprs,
        )  # fmt: skip
        return compiled


MAX_PLANS = 1024  # per launcher: a workload of ever-new sizes starts over rather than grows


def cached_plan(cache: dict, key: tuple, build, *args):
    """cache[key], made by build(*args) on a miss: a launcher's launch plan (block sizes, grids,
    BoundLaunches) for inputs and options summed up by `key`. Under tracing it is built each
    time: traced sizes are symbolic, and what a trace decides must not outlive it."""
    if getattr(_state, "traced", False):
        return build(*args)
    plan = cache.get(key)
    if plan is None:
        if len(cache) >= MAX_PLANS:
            cache.clear()
        plan = cache[key] = build(*args)
    return plan


def launch_kernel(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta): args are the kernel's leading parameters, positionally;
    meta its constexprs (by name) and launch options (num_warps, num_stages, maxnreg)."""
    if getattr(_state, "traced", False):
        return _record_launch(kernel, grid, args, meta)
    if _generic_only(kernel):
        return kernel[grid](*args, **meta)
    device = driver.active.get_current_device()
    if len(_compiled) >= MAX_CACHED:  # a workload of ever-new sizes: start over rather than grow
        _compiled.clear()
    cache_key = (id(kernel), device, specialization_key(args, meta, id(kernel)))  # kernels live as long as modules
    entry = _compiled.get(cache_key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)  # compiles (first time) and launches
        if _is_compiled(compiled):
            _compiled[cache_key] = (compiled, _constexpr_values(kernel, len(args), meta))
        return compiled
    compiled, constexprs = entry
    grid = tuple(grid) + (1,) * (3 - len(grid))
    stream = driver.active.get_current_stream(device)
    compiled.run(
        grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
        *args, *constexprs,
    )  # fmt: skip
    return compiled
