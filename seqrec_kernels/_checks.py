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


_value_checks: bool | None = None  # value_checks() sets it; None: the default (see value_checks)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """How the ops check index values (seq_lens, cu_seqlens, item ids in range).

    By default values are checked where they live: index tensors on the CPU at once (a clear
    ValueError from the call), index tensors on a device without a host sync: the check runs
    on the device and sets an error flag that `seqrec_kernels.check()` turns into the same
    ValueError (one sync, where the caller chooses). The kernels never read or write out of
    bounds for any value (out-of-range ids are masked, sequence offsets clamped).

    Within `with value_checks(True):` device values are read at once too (a sync per check:
    for debugging, to find the call). Within `with value_checks(False):` nothing is checked
    (a training loop whose batches are valid by construction, as the trainer's)."""
    global _value_checks
    check_bool("enabled", enabled)
    previous, _value_checks = _value_checks, enabled
    try:
        yield
    finally:
        _value_checks = previous


def values_on_host(values: torch.Tensor) -> bool:
    """Whether reading `values` costs no device sync (the one place that decides it)."""
    return values.is_cpu  # not values.device.type: no device object per call


def values_checkable() -> bool:
    """Whether tensor values may be read on the host: not while torch.compile traces (the
    values are symbolic) nor while a CUDA graph is captured (a sync would break capture)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def value_check_mode(values: torch.Tensor) -> str | None:
    """How the index values of `values` are checked now: "now" (read on the host), "deferred"
    (a device-side flag for check()) or None (not at all)."""
    if _value_checks is False or not values.numel() or not values_checkable():
        return None
    return "now" if _value_checks or values_on_host(values) else "deferred"


# Device-side error flags of the deferred checks: (argument, device) -> [bool flag, message].
_device_errors: dict[tuple[str, torch.device], list] = {}


def defer_error(name: str, bad: torch.Tensor, message: str) -> None:
    """Records on the device, without a sync, that the check of `name` failed if the bool
    scalar `bad` is true; check() raises ValueError(message) then."""
    entry = _device_errors.get((name, bad.device))
    if entry is None:
        with torch.inference_mode(False):  # a flag that later calls update in place, in or out of it
            _device_errors[(name, bad.device)] = [bad.clone(), message]
    else:
        entry[0].logical_or_(bad)
        entry[1] = message


def check() -> None:
    """Raises the ValueError of the first invalid index values that ops saw on device tensors
    since the last check() (value_checks' default); one host sync. Clears the flags."""
    errors = list(_device_errors.values())
    _device_errors.clear()
    for flag, message in errors:
        if bool(flag):
            raise ValueError(
                f"{message} (in a call on {flag.device} before this seqrec_kernels.check(); under "
                "seqrec_kernels.value_checks(True) the call itself raises)"
            )


def values_outside(name: str, expected: str) -> str:
    """The message of a deferred check_values (the values themselves stay on the device)."""
    return f"{name}: expected {expected}, got values outside"


def check_values(name: str, values: torch.Tensor, low: int, high: int, expected: str, *,
                 allowed: int | None = None, show_all: bool = False) -> None:  # fmt: skip
    """Index values in [low, high] (or equal to `allowed`), as value_check_mode says: at once
    ValueError("<name>: expected <expected>, got ..."), the first five bad values (show_all:
    every value), or deferred to check() on a device."""
    mode = value_check_mode(values)
    if mode is None:
        return
    if mode == "deferred":
        bad = values.clamp(low, high).ne(values)
        if allowed is not None and not low <= allowed <= high:
            bad &= values.ne(allowed)
        defer_error(name, bad.any(), values_outside(name, expected))
        return
    smallest, largest = (int(x) for x in torch.aminmax(values))
    if low <= smallest and largest <= high:
        return
    bad = (values < low) | (values > high)
    if allowed is not None:
        bad &= values != allowed
    if bool(bad.any()):
        got = values.tolist() if show_all else f"e.g. {values[bad][:5].tolist()}"
        raise ValueError(f"{name}: expected {expected}, got {got}")


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
