"""HostReadCounter: every read of a tensor's values on the host, wherever it happens.

    from host_reads import HostReadCounter
    with HostReadCounter() as counter:
        ...
    assert counter.reads == []   # one name per read: the op (or Tensor method) that read

On a GPU each such read waits for the device (a sync). On CPU the tests' tensors stand
in for device tensors: a read counts whatever the device, so a CPU test sees the syncs a
GPU run would have. It counts at the level where reads happen:

- a TorchDispatchMode sees every aten op after autograd and the CompositeImplicit
  decompositions (`x[mask]` arrives as `index.Tensor` with a bool index, `.item()`,
  `bool()`, `int()` as `_local_scalar_dense`); an op reads when torch tags it
  data-dependent (its result or output shape depends on values: equal, allclose,
  nonzero, masked_select, unique, bincount, repeat_interleave without output_size, ...),
  indexes or assigns through a bool mask, or copies a device tensor to the CPU;
- custom ops implemented in Python (torch.library.custom_op: this project's reference and
  Triton ops) run with the mode still active, so the reads inside them are seen too; C++
  ops are kernels, like aten's (on CPU, `cpp` runs the C++ loops that stand in for CUDA
  kernels; the CUDA glue's own syncs show under torch.cuda.set_sync_debug_mode);
- Tensor methods that read without dispatching an op on a CPU tensor (`tolist`, `numpy`,
  `cpu`, `to(<cpu>)`) are patched for the duration;
- a kernel launched in Triton's interpreter is device work: nothing inside it counts;
- this project's ops take their eager path as without the counter (the C++ front, whose
  Triton launchers' tensor ops the counter still sees, or the lean Python path; they take the
  custom-op path under other dispatch modes), and check index values as on a device (a
  deferred flag), not at once as they do on the host.

host_tensors(): tensors that live on the host on a GPU too (torch.optim's step counters),
whose reads are not syncs.
"""

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode_stack

from seqrec_kernels import _checks
from seqrec_kernels.ops import _library

try:  # Triton's interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors: their loads are device work
    from triton.runtime.interpreter import GridExecutor as _InterpretedLaunch
except ImportError:
    _InterpretedLaunch = None

aten = torch.ops.aten
# The tags torch's fake tensors refuse to run without values (equal, allclose, nonzero, ...).
_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPY_OPS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


def _is_cpu(device) -> bool:
    return device is not None and torch.device(device).type == "cpu"


def _reads(func, args, kwargs) -> bool:
    """Whether running `func` reads tensor values on the host."""
    if func in _INDEX_OPS:  # only a bool/uint8 mask index is data-dependent (it runs nonzero)
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in _COPY_OPS:  # a device tensor copied to the host (on a GPU; on CPU see Tensor.cpu/to)
        if func is aten._to_copy.default:
            return _is_cpu(kwargs.get("device")) and args[0].device.type != "cpu"
        return args[1].device.type == "cpu" and args[0].device.type != "cpu"  # copy_(dst, src)
    return any(tag in func.tags for tag in _TAGS)


def _first_tensor(args):
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


class HostReadCounter(TorchDispatchMode):
    def __init__(self, host_tensors=lambda: ()):
        super().__init__()
        self.reads: list[str] = []
        self._host_tensors = host_tensors
        self._in_method = 0  # inside a patched Tensor method: its own ops are not counted again
        self._saved = {}

    def _on_host(self, tensor) -> bool:
        return any(tensor is t for t in self._host_tensors())

    def _record(self, name, tensor):
        if not self._in_method and not self._on_host(tensor):
            self.reads.append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads(func, args, kwargs):
            self._record(str(func.overloadpacket.__name__), _first_tensor(args))
        first = _first_tensor(args)
        if first is None or _maybe_get_opdef(func._schema.name) is None:
            return func(*args, **kwargs)  # aten or C++ ops: the op is the kernel
        # A custom op implemented in Python: run it (below this mode's dispatch key) with the mode active.
        keys = torch._C._dispatch_keys(first) & _BELOW_PYTHON
        TorchDispatchMode.__enter__(self)
        try:
            return func.redispatch(keys, *args, **kwargs)
        finally:
            TorchDispatchMode.__exit__(self, None, None, None)

    def _patch(self, owner, name, reads):
        """owner.<name> records a read when reads(self, *args, **kwargs)."""
        original = getattr(owner, name)
        self._saved[owner, name] = original
        counter = self

        def patched(tensor, *args, **kwargs):
            if reads(tensor, *args, **kwargs):
                counter._record(name, tensor)
            counter._in_method += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._in_method -= 1

        setattr(owner, name, patched)

    def __enter__(self):
        always = lambda *args, **kwargs: True  # noqa: E731
        for name in ("tolist", "numpy", "cpu"):
            self._patch(torch.Tensor, name, always)
        self._patch(torch.Tensor, "to", lambda t, *args, **kwargs: _is_cpu(torch._C._nn._parse_to(*args, **kwargs)[0]))
        if _InterpretedLaunch is not None:
            self._patch(_InterpretedLaunch, "__call__", lambda *args, **kwargs: False)
        # The ops take their eager path (what users run) only without a dispatch mode: this
        # counter must not make them take the custom-op path instead.
        eager_possible = _library._eager_possible
        self._saved[_library, "_eager_possible"] = eager_possible

        def eager_possible_but_for_counters(first):
            if all(isinstance(mode, HostReadCounter) for mode in _get_current_dispatch_mode_stack()):
                with _disable_current_modes():
                    return eager_possible(first)
            return eager_possible(first)

        _library._eager_possible = eager_possible_but_for_counters
        # The eager path enters C++ ops below dispatch (OpOverload.redispatch): kernels, as above.
        redispatch = torch._ops.OpOverload.redispatch
        self._saved[torch._ops.OpOverload, "redispatch"] = redispatch
        counter = self

        def redispatch_kernels_unseen(op, *args, **kwargs):
            kernel = _maybe_get_opdef(op._schema.name) is None
            counter._in_method += kernel
            try:
                return redispatch(op, *args, **kwargs)
            finally:
                counter._in_method -= kernel

        torch._ops.OpOverload.redispatch = redispatch_kernels_unseen
        # Index values are checked as on a device (a flag for check(), no read), not at once as on the host.
        self._saved[_checks, "values_on_host"] = _checks.values_on_host
        _checks.values_on_host = lambda values: False
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for (owner, name), original in self._saved.items():
                setattr(owner, name, original)
            self._saved.clear()
