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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import torch

from .._checks import accumulation_dtype
from ..backends import EXTENSION_ERROR, Backend, cpp_op
from ..triton import implementation

# The Python schemas of each family, name -> (forward, backward) (tests/test_op_schemas.py).
SCHEMAS: dict[str, tuple[str, str]] = {}

_TENSOR = torch._C.OptionalType(torch._C.TensorType.get())  # Tensor and Tensor? are its subtypes


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
    return fwd
