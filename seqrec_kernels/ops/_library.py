"""The one registration path of the torch ops. Each op family (attention, sampled_softmax,
full_softmax) is a forward/backward pair per backend,

    seqrec::<family>_fwd_<backend>    seqrec::<family>_bwd_<backend>

defined here from the reference and Triton implementations with the schemas its ops
module spells, or taken from seqrec_kernels._C for the `cuda` backend (csrc/ops.cpp
defines those; tests/test_op_schemas.py checks that the two spell the same schemas).
For every pair this module registers the fake impls (opcheck, torch.compile) and the
autograd formula, both derived from the ops' schemas by one convention:

- the forward returns its differentiable output first; the others (the LSE) are not
  differentiable;
- the backward takes the gradient of that output first; each of its other arguments is
  a forward argument or output of the same name, or an option read when it runs;
- the backward returns the gradients of the forward's leading arguments, in order, each
  like its input; every later forward argument gets none.

Under torch.autocast those leading (differentiable) arguments are the ones cast to the
autocast dtype: the matmul operands (q, k, v; hidden, item_weight), as torch casts a
linear layer's. Everything else (ids, log-q corrections, the float32 losses and LSE the
kernels return) keeps its dtype.

Two entry points run each op (`Op`): the registered custom op, for torch.compile, fake
tensors, opcheck and dispatch modes, and a lean eager path for plain eager calls: one
`torch.autograd.Function` that calls the same forward and backward implementations with
the same saved values and backward rule, without the Python wrappers of custom_op /
register_autograd (about 150 us of host time per call). docs/host-path.md has the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping

import torch

from .._checks import accumulation_dtype
from ..backends import EXTENSION_ERROR, TRITON_INTERPRETED_AT_IMPORT, Backend, cpp_op
from ..triton import implementation

# The dispatch key of each device type's autocast, where the cast rule is registered.
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIBRARY = torch.library.Library("seqrec", "FRAGMENT")

# The Python schemas of each family, name -> (forward, backward) (tests/test_op_schemas.py).
SCHEMAS: dict[str, tuple[str, str]] = {}

_TENSOR = torch._C.OptionalType(torch._C.TensorType.get())  # Tensor and Tensor? are its subtypes


@torch.compiler.assume_constant_result  # torch.compile reads it when tracing, as inductor's matmuls do
def _medium_float32_precision() -> bool:
    return torch.get_float32_matmul_precision() == "medium"


def extension_operands(backend: Backend, *operands: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The matmul operands the extension's ops (cuda, cpp) get. Under torch's "medium"
    float32 matmul precision, float32 operands become bfloat16 copies: the extension
    multiplies float32 on FFMA only and bfloat16 on tensor cores (the Triton kernels convert
    their tiles in registers instead). Autograd casts the gradients back to float32."""
    if backend in (Backend.CUDA, Backend.CPP) and _medium_float32_precision():
        return tuple(t.to(torch.bfloat16) if t.dtype == torch.float32 else t for t in operands)
    return operands


def excluded_items(exclude_items, num_items: int, device: torch.device) -> tuple[tuple[int, ...], torch.Tensor]:
    """The ids of exclude_items, sorted and distinct, checked to be in [0, N), and as an int32
    tensor on `device`: built once per (ids, N, device), not per call (a host-to-device copy)."""
    if torch.compiler.is_compiling():
        return _excluded_items.__wrapped__(tuple(exclude_items), num_items, device)
    return _excluded_items(tuple(exclude_items), num_items, device)


@functools.lru_cache(maxsize=64)
def _excluded_items(exclude_items: tuple, num_items: int, device: torch.device):
    excluded = tuple(sorted(set(exclude_items)))
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_items for i in excluded):
        raise ValueError(f"exclude_items: expected item ids in [0, {num_items}) (N), got {list(exclude_items)}")
    with torch.inference_mode(False):  # a tensor autograd may save, even if first built in inference mode
        return excluded, torch.tensor(excluded, dtype=torch.int32, device=device)


def empty_stats(like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialized LSE or per-row loss of `shape` for inputs like `like`, as every
    backend returns them: on its device, in accumulation_dtype(like.dtype). For fake impls."""
    return like.new_empty(shape, dtype=accumulation_dtype(like.dtype))


def define_ops(
    family: str,
    schemas: tuple[str, str],
    *,
    implementations: tuple[str, str],
    outputs: tuple[str, ...],
    fake: Callable,
    backward_options: Mapping[str, Callable[[], object]] | None = None,
) -> dict[Backend, Callable]:
    """Defines op family `family` on every backend and returns its differentiable forward op per backend.

    schemas: the (forward, backward) schemas without the op name, "(Tensor q, ...) -> (Tensor, Tensor)".
    implementations: (module, prefix): the reference and Triton ops run `<prefix>_forward` and
        `<prefix>_backward` of seqrec_kernels.reference.<module> and seqrec_kernels.triton.<module>.
    outputs: the names of the forward's outputs, as the backward's arguments call them.
    fake: the forward's fake impl: its arguments -> outputs of the right shapes and dtypes.
    backward_options: backward arguments that are no forward argument, name -> a function
        that gives the value when the backward runs.
    """
    SCHEMAS[family] = schemas
    module, prefix = implementations
    reference = importlib.import_module(f"seqrec_kernels.reference.{module}")
    python_impls = {
        Backend.REFERENCE: [getattr(reference, f"{prefix}_{phase}") for phase in ("forward", "backward")],
        Backend.TRITON: [implementation(module, f"{prefix}_{phase}") for phase in ("forward", "backward")],
    }
    ops = {}
    for backend in (Backend.REFERENCE, Backend.TRITON, Backend.CUDA):
        if backend is Backend.CUDA and EXTENSION_ERROR is not None:
            continue
        names = [f"seqrec::{family}_{phase}_{backend.value}" for phase in ("fwd", "bwd")]
        if backend in python_impls:  # else seqrec_kernels._C defines the pair
            for name, function, schema in zip(names, python_impls[backend], schemas):
                op = torch.library.custom_op(name, function, mutates_args=(), schema=schema)
                if backend is Backend.TRITON:
                    _decompose_when_traced(op, function)
                    _register_device_kernels(name, function)
            impls = python_impls[backend]
        else:  # the C++ ops below autograd and autocast: their CPU or CUDA kernel
            impls = [_below_autograd(cpp_op(name)) for name in names]
        ops[backend] = _register(*names, outputs, fake, dict(backward_options or {}), impls)
    if Backend.CUDA in ops:  # the same C++ ops: CUDA kernels on CUDA tensors, C++ loops on CPU tensors
        ops[Backend.CPP] = ops[Backend.CUDA]
    return ops


def _decompose_when_traced(op, launcher: Callable) -> None:
    """Makes a Triton op's kernels visible to torch.compile: what torch.library.triton_op adds
    to a custom op (triton_op infers the schema from type annotations, which spell the ops'
    `int`s as SymInt, so the ops keep their schemas and get the rule here). Under
    FunctionalTensorMode, where AOTAutograd traces torch.compile's forward and backward graphs
    (and opcheck's), the op is replaced by its launcher, run on the traced tensors with its
    launches recorded through torch.library.wrap_triton: the graph holds the Triton kernels
    (triton_kernel_wrapper_functional), which Inductor launches from its own code, without
    the op's Python, and cudagraph trees capture. The launch plan (block sizes, tuning table
    entries, float32 precision mode) is fixed when the graph is traced.
    The op stays opaque under Triton's interpreter (its kernels cannot run on fake tensors),
    for torch.export (as triton_op's does: an op a program can serialize) and on tensor
    subclasses other than the tracing ones."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def rule(mode, func, types, args, kwargs):
        if TRITON_INTERPRETED_AT_IMPORT or _export_keeps_custom_ops():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        if any(t is not torch.Tensor and not issubclass(t, (FakeTensor, FunctionalTensor)) for t in types):
            return NotImplemented
        from ..triton._launch import traced_launches  # imports Triton: only when tracing its ops

        with mode, traced_launches():
            return launcher(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, rule)


def _register_device_kernels(name: str, launcher: Callable) -> None:
    """The launcher as the op's own CPU and CUDA kernel, which the C++ front's redispatch runs
    without custom_op's per-call wrappers (an aliasing check and Dynamo's disable frame: about
    8 us a call, docs/host-path.md); custom_op's registration serves the other keys."""
    for key in ("CPU", "CUDA"):
        _LIBRARY.impl(name.split("::")[1], launcher, key)


def _export_keeps_custom_ops() -> bool:
    """Whether torch.export is tracing with custom Triton ops kept whole (torch >= 2.7)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


# The backend dispatch key of each device type the extension's ops run on.
_BACKEND_KEYS = {t: torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, t.upper())) for t in ("cpu", "cuda")}


def _below_autograd(op) -> Callable:
    """op(*args) dispatched straight to its kernel for the device of args[0] (CPU or CUDA),
    below autograd and autocast: what the eager path calls inside its autograd.Function."""

    def run(*args):
        return op.redispatch(_BACKEND_KEYS[args[0].device.type], *args)

    return run


def _eager_possible(first: torch.Tensor) -> bool:
    """Whether an eager call may skip the custom op: nothing traces or intercepts dispatch (no
    torch.compile, no TorchDispatchMode such as fake tensors or a counter, no functorch
    transform, no tensor subclass). Otherwise the custom op runs, which all of them support."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._are_functorch_transforms_active()
        or type(first) not in (torch.Tensor, torch.nn.Parameter)
    )


@dataclasses.dataclass(frozen=True)
class Op:
    """One backend's op of a family: `op` is the registered custom op; calling an Op runs the
    eager path (`eager`, the same implementations under one autograd.Function) when
    _eager_possible, else the custom op. Both apply the autocast rule of _register_autocast."""

    op: Callable
    eager: Callable

    def __call__(self, *args):
        if _eager_possible(args[0]):
            return self.eager(*args)
        return self.op(*args)


def _register(fwd_name: str, bwd_name: str, outputs, fake, backward_options, impls) -> Op:
    """Registers the fake impls and autograd of the defined pair; returns the family's Op,
    whose eager path runs impls (forward, backward implementations) with the same rule."""
    fwd, bwd = cpp_op(fwd_name), cpp_op(bwd_name)
    arguments = [arg.name for arg in fwd._schema.arguments]
    _gradient, *needed = [arg.name for arg in bwd._schema.arguments]
    differentiable = arguments[: len(bwd._schema.returns)]
    known = {*arguments, *outputs, *backward_options}
    if (
        len(outputs) != len(fwd._schema.returns)
        or set(outputs) & set(arguments)
        or not set(needed) <= known
        or not set(differentiable) <= set(needed)
        or any(str(arg.type) != "Tensor" for arg in fwd._schema.arguments[: len(differentiable)])
    ):
        raise TypeError(f"{fwd_name} / {bwd_name}: the schemas do not follow the convention of {__name__}")
    tensors = {*outputs, *(arg.name for arg in fwd._schema.arguments if arg.type.isSubtypeOf(_TENSOR))}
    saved = [name for name in needed if name in tensors]
    options = [name for name in needed if name not in tensors and name not in backward_options]
    num_non_differentiable = len(arguments) - len(differentiable)
    grad_like = [1 + needed.index(name) for name in differentiable]  # in the backward's arguments

    torch.library.register_fake(fwd_name, fake)
    torch.library.register_fake(bwd_name, lambda *args: tuple(torch.empty_like(args[i]) for i in grad_like))

    # Positions, resolved once: of the saved tensors and options in (*inputs, *outputs), and of
    # each backward argument in (*saved tensors, *options, *backward options' values).
    position = {name: i for i, name in enumerate([*arguments, *outputs])}
    saved_at, options_at = [position[n] for n in saved], [position[n] for n in options]
    kept = [*saved, *options, *backward_options]
    needed_at = [kept.index(name) for name in needed]
    reads = list(backward_options.values())

    def setup_context(ctx, inputs, output):  # torch passes these by name
        values = (*inputs, *output)
        ctx.save_for_backward(*[values[i] for i in saved_at])
        ctx.options = [values[i] for i in options_at]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the other outputs' gradients are never read: no zeros

    def backward_with(backward):
        """The backward rule, running `backward` on the gradient of the first output."""

        def rule(ctx, grad, *_other_grads):
            if grad is None:  # the first output took no part in what is differentiated
                return (None,) * len(arguments)
            values = (*ctx.saved_tensors, *ctx.options, *[read() for read in reads])
            grads = backward(grad, *[values[i] for i in needed_at])
            return (*grads, *([None] * num_non_differentiable))

        return rule

    torch.library.register_autograd(fwd_name, backward_with(bwd), setup_context=setup_context)
    for device_type in _AUTOCAST_KEYS:
        _register_autocast(fwd, device_type, len(differentiable))
        _register_autocast(bwd, device_type, 0)  # a backward inside the region runs on what the forward saved

    forward_impl, backward_impl = impls

    def eager_forward(ctx, *inputs):
        output = forward_impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # The custom op's autograd on the implementations, named for its op: its nodes show as
    # <op>_eagerBackward (e.g. attention_fwd_triton_eagerBackward).
    eager = type(
        f"{fwd_name.split('::')[1]}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(eager_forward), "backward": staticmethod(backward_with(_autocast_off(backward_impl)))},
    )
    return Op(fwd, _with_autocast(eager.apply, len(differentiable)))


def _autocast_off(backward: Callable) -> Callable:
    """backward(grad, *args) with autocast off: a backward called inside an autocast region runs
    on what the forward saved, as the custom ops' rule runs theirs (_register_autocast); else the
    Python implementations' matmuls would run in the autocast dtype."""

    def run(grad, *args):
        device_type = grad.device.type
        if device_type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return backward(grad, *args)
        return backward(grad, *args)

    return run


def _with_autocast(apply: Callable, num_operands: int) -> Callable:
    """apply(*args), under torch.autocast on the first num_operands arguments cast as the
    custom ops' autocast rule (_register_autocast) casts them, autocast off inside."""

    def call(*args):
        device_type = args[0].device.type
        if device_type not in _AUTOCAST_KEYS or not torch.is_autocast_enabled(device_type):
            return apply(*args)
        dtype = torch.get_autocast_dtype(device_type)
        cast = [_autocast_cast(arg, device_type, dtype) for arg in args[:num_operands]]
        with torch.autocast(device_type, enabled=False):
            return apply(*cast, *args[num_operands:])

    return call


def _autocast_cast(arg, device_type: str, dtype: torch.dtype):
    """arg in the autocast dtype if torch's autocast would cast it (a floating tensor of the
    region's device, not float64), else arg."""
    eligible = isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.dtype != torch.float64
    if not eligible or arg.device.type != device_type:
        return arg
    return arg.to(dtype)


def _register_autocast(op, device_type: str, num_operands: int) -> None:
    """Under torch.autocast(device_type), `op` runs on its first `num_operands` arguments
    cast to the autocast dtype (float16 or bfloat16; float64 and non-float tensors are left
    as they are, as torch's own autocast does), with autocast off inside (the reference's
    own matmuls stay in the dtype they are given). What
    torch.library.register_autocast does, except that the dtype is the autocast region's,
    not one fixed when the rule is registered."""
    key = _AUTOCAST_KEYS[device_type]
    exclude_autocast = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def rule(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [_autocast_cast(arg, device_type, dtype) for arg in args[:num_operands]] + list(args[num_operands:])
        with torch._C._ExcludeDispatchKeyGuard(exclude_autocast):
            return op(*args)

    op.py_impl(getattr(torch._C.DispatchKey, key))(rule)  # what tracing (torch.compile) calls
    _LIBRARY.impl(op.__name__.split(".")[0], lambda _keyset, *args: rule(*args), key, with_keyset=True)


# Forward-only families (retrieval returns ids, ranks and scores nobody differentiates):
# one op per backend, seqrec::<family>_<backend>, with no C++ twin; name -> schema.
FORWARD_SCHEMAS: dict[str, str] = {}


def define_forward_ops(
    family: str, schema: str, *, functions: tuple[str, str], fake: Callable
) -> dict[Backend, Callable]:
    """Defines op family `family` on the reference and Triton backends and returns its op per
    backend. The ops have fake impls (opcheck, torch.compile) and no autograd formula: the
    public function hands them detached inputs. Under torch.autocast their first two
    arguments, the matmul operands (hidden, weight), are cast as the other ops' are.

    schema: without the op name, "(Tensor hidden, Tensor weight, ...) -> (Tensor, Tensor)".
    functions: (module, name): the ops run `name` of seqrec_kernels.reference.<module> and
        seqrec_kernels.triton.<module>.
    fake: the op's fake impl: its arguments -> outputs of the right shapes and dtypes.
    """
    FORWARD_SCHEMAS[family] = schema
    module, name = functions
    reference = importlib.import_module(f"seqrec_kernels.reference.{module}")
    python_impls = {Backend.REFERENCE: getattr(reference, name), Backend.TRITON: implementation(module, name)}
    ops = {}
    for backend, function in python_impls.items():
        op_name = f"seqrec::{family}_{backend.value}"
        op = torch.library.custom_op(op_name, function, mutates_args=(), schema=schema)
        if backend is Backend.TRITON:
            _decompose_when_traced(op, function)
        torch.library.register_fake(op_name, fake)
        ops[backend] = Op(cpp_op(op_name), _with_autocast(function, 2))
        for device_type in _AUTOCAST_KEYS:
            _register_autocast(ops[backend].op, device_type, 2)
    return ops
