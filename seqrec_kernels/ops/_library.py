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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import torch

from .._checks import accumulation_dtype
from ..backends import EXTENSION_ERROR, Backend, cpp_op
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
                torch.library.custom_op(name, function, mutates_args=(), schema=schema)
        ops[backend] = _register(*names, outputs, fake, dict(backward_options or {}))
    if Backend.CUDA in ops:  # the same C++ ops: CUDA kernels on CUDA tensors, C++ loops on CPU tensors
        ops[Backend.CPP] = ops[Backend.CUDA]
    return ops


def _register(fwd_name: str, bwd_name: str, outputs, fake, backward_options):
    """Registers the fake impls and autograd of the defined pair; returns the forward op."""
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

    def setup_context(ctx, inputs, output):  # torch passes these by name
        values = dict(zip(arguments, inputs)) | dict(zip(outputs, output))
        ctx.save_for_backward(*(values[name] for name in saved))
        ctx.options = [values[name] for name in options]
        ctx.mark_non_differentiable(*output[1:])

    def backward_rule(ctx, grad, *_other_grads):
        values = dict(zip(saved, ctx.saved_tensors)) | dict(zip(options, ctx.options))
        values.update((name, read()) for name, read in backward_options.items())
        grads = bwd(grad, *(values[name] for name in needed))
        return (*grads, *([None] * num_non_differentiable))

    torch.library.register_autograd(fwd_name, backward_rule, setup_context=setup_context)
    for device_type in _AUTOCAST_KEYS:
        _register_autocast(fwd, device_type, len(differentiable))
        _register_autocast(bwd, device_type, 0)  # a backward inside the region runs on what the forward saved
    return fwd


def _register_autocast(op, device_type: str, num_operands: int) -> None:
    """Under torch.autocast(device_type), `op` runs on its first `num_operands` arguments
    cast to the autocast dtype (float16 or bfloat16; float64 and non-float tensors are left
    as they are, as torch's own autocast does), with autocast off inside (the reference's
    own matmuls stay in the dtype they are given). What
    torch.library.register_autocast does, except that the dtype is the autocast region's,
    not one fixed when the rule is registered."""
    key = _AUTOCAST_KEYS[device_type]
    exclude_autocast = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast(arg):
        eligible = isinstance(arg, torch.Tensor) and arg.is_floating_point() and arg.dtype != torch.float64
        if not eligible or arg.device.type != device_type:
            return arg
        return arg.to(torch.get_autocast_dtype(device_type))

    def rule(*args):
        args = [cast(arg) for arg in args[:num_operands]] + list(args[num_operands:])
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
        torch.library.custom_op(op_name, function, mutates_args=(), schema=schema)
        torch.library.register_fake(op_name, fake)
        ops[backend] = cpp_op(op_name)
        for device_type in _AUTOCAST_KEYS:
            _register_autocast(ops[backend], device_type, 2)
    return ops
