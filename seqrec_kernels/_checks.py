"""Input validation shared by the public ops: errors name the argument, the expected and
the actual shape/dtype/device."""

import contextlib
import math
from collections.abc import Sequence

import torch


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    layout: str = "",
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        shape = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected {ndim} dimensions{shape}, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}, got {str(value.dtype).removeprefix('torch.')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of the other inputs), got {value.device}")


def check_same(name: str, value: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """`value` has the shape, dtype and device of `like`."""
    if value.shape != like.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)} (the shape of {like_name}), got {tuple(value.shape)}"
        )
    if value.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {value.device}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def check_real(name: str, value, *, low: float, high: float, high_inclusive: bool = False) -> float:
    """A real number in [low, high) (or [low, high]); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not (inside and math.isfinite(value)):
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name}: expected a value in [{low}, {high}{bracket}, got {value}")
    return float(value)


_value_checks = True  # value_checks() switches it


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Within `with value_checks(False):` the ops skip the checks that read index values
    on the host (seq_lens, cu_seqlens, item ids in range). On a GPU each such check is a
    device sync per call; a training loop whose batches are valid by construction (the
    trainer's) turns them off. Out-of-range ids are still masked by the kernels, but
    invalid sequence offsets are then undefined behaviour."""
    global _value_checks
    check_bool("enabled", enabled)
    previous, _value_checks = _value_checks, enabled
    try:
        yield
    finally:
        _value_checks = previous


def value_checks_enabled() -> bool:
    """Whether an op checks index values now: enabled and readable (values_checkable())."""
    return _value_checks and values_checkable()


def values_checkable() -> bool:
    """Whether tensor values may be read on the host: not while torch.compile traces (the
    values are symbolic) nor while a CUDA graph is captured (a sync would break capture)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 is reference-only
INDEX_DTYPES = (torch.int32, torch.int64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The one output-dtype rule of the ops: float64 for float64 inputs, else float32. It is
    the dtype of every op's LSE and per-row losses (the fake impls say so) and the dtype the
    reference computes in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_kernel_dtype(backend_name: str, name: str, value: torch.Tensor) -> None:
    """Kernel backends take half and single precision; float64 runs on the reference."""
    if backend_name != "reference" and value.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name}: the {backend_name!r} backend takes float16, bfloat16 or float32, got {value.dtype} "
            "(float64 runs on backend='reference')"
        )
