"""sampled_softmax_loss / full_softmax_loss: validation, dispatch and the torch ops.

Every backend implements `seqrec::sampled_softmax_{fwd,bwd}_<backend>` and
`seqrec::full_softmax_{fwd,bwd}_<backend>` over 2-D hidden [T, D] and per-row outputs
(see `seqrec_kernels/reference/softmax_loss.py` for the contract); the reduction is done
here in plain PyTorch. Gradients flow to hidden and item_weight only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch

from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_choice,
    check_real,
    check_tensor,
    check_values,
    defer_error,
    value_check_mode,
    values_outside,
)
from .._limits import check_kernel_hidden_dim
from ..backends import Backend, resolve_for
from . import _front
from ._library import define_ops, empty_stats, excluded_items, extension_operands

REDUCTIONS = ("mean", "sum", "none")

_SAMPLED_SCHEMAS = (
    "(Tensor hidden, Tensor weight, Tensor pos_ids, Tensor neg_ids, Tensor? pos_log_q, Tensor? neg_log_q,"
    " int rows_per_group, bool remove_hits, float temperature, int ignore_index) -> (Tensor, Tensor)",
    "(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor pos_ids, Tensor neg_ids, Tensor? pos_log_q,"
    " Tensor? neg_log_q, Tensor lse, int rows_per_group, bool remove_hits, float temperature,"
    " int ignore_index, bool deterministic) -> (Tensor, Tensor)",
)
_FULL_SCHEMAS = (
    "(Tensor hidden, Tensor weight, Tensor targets, Tensor excluded_ids, float temperature,"
    " int ignore_index) -> (Tensor, Tensor)",
    "(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor targets, Tensor excluded_ids, Tensor lse,"
    " float temperature, int ignore_index) -> (Tensor, Tensor)",
)


def _fake_row_outputs(hidden, *_):
    """Per-row loss and LSE [T]."""
    return empty_stats(hidden, hidden.shape[0]), empty_stats(hidden, hidden.shape[0])


# Both losses' ops return the per-row loss and LSE, and run `<kind>_forward` / `<kind>_backward`.
_define_loss_ops = functools.partial(define_ops, outputs=("loss", "lse"), fake=_fake_row_outputs)
_SAMPLED_OPS = _define_loss_ops(
    "sampled_softmax",
    _SAMPLED_SCHEMAS,
    implementations=("softmax_loss", "sampled"),
    # Deterministic when torch.use_deterministic_algorithms(True) is in effect.
    backward_options={"deterministic": torch.are_deterministic_algorithms_enabled},
)
_FULL_OPS = _define_loss_ops("full_softmax", _FULL_SCHEMAS, implementations=("softmax_loss", "full"))


def _check_hidden_and_weight(hidden, item_weight):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected 2 dimensions [T, D] or 3 [B, L, D], got shape {tuple(hidden.shape)}")
    check_tensor("item_weight", item_weight, ndim=2, layout="[N, D]", device=hidden.device)
    if item_weight.dtype != hidden.dtype:
        raise TypeError(f"item_weight: expected dtype {hidden.dtype} (the dtype of hidden), got {item_weight.dtype}")
    if item_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"item_weight: expected D={hidden.shape[-1]} columns (the last dimension of hidden), "
            f"got shape {tuple(item_weight.shape)}"
        )
    if item_weight.shape[0] == 0:
        raise ValueError("item_weight: expected at least one item row, got shape (0, D)")


def _ids_expected(num_items) -> str:
    return f"item ids in [0, {num_items}) (N)"


def _check_ids(name, ids, shape, device, num_items, ignore_index=None):
    """Integer ids of `shape` in [0, num_items) (ignore_index allowed where given)."""
    check_tensor(name, ids, dtypes=INDEX_DTYPES, device=device)
    if ids.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(ids.shape)}")
    check_values(name, ids, 0, num_items - 1, _ids_expected(num_items), allowed=ignore_index)


def _excluded_target(excluded) -> str:
    return f"targets: a non-ignored target is an excluded item ({list(excluded)}); excluded items are never classes"


def _check_targets_not_excluded(targets, excluded, excluded_ids, ignore_index) -> None:
    """No target that counts is an excluded item (value_checks says when and where)."""
    if not set(excluded) - {ignore_index}:  # only the ignored id is excluded: nothing to check
        return
    mode = value_check_mode(targets)
    if mode is None:
        return
    excluded_target = (torch.isin(targets, excluded_ids) & (targets != ignore_index)).any()
    message = _excluded_target(excluded)
    if mode == "deferred":
        defer_error("targets", excluded_target, message)
    elif bool(excluded_target):
        raise ValueError(message)


def _check_log_q(name, log_q, ids_name, ids):
    if log_q is None:
        return None
    check_tensor(name, log_q, dtypes=FLOAT_DTYPES, device=ids.device)
    if log_q.shape != ids.shape:
        raise ValueError(
            f"{name}: expected shape {tuple(ids.shape)} (the shape of {ids_name}), got {tuple(log_q.shape)}"
        )
    return log_q


def _check_common(temperature, ignore_index, reduction):
    temperature = check_real("temperature", temperature, low=0.0, high=math.inf)
    if temperature <= 0.0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    return temperature


def _resolve(backend, hidden, op_name) -> Backend:
    """The backend that runs `op_name`, once it is known to take hidden's dtype and size."""
    chosen = resolve_for(backend, op_name, "hidden", hidden)
    check_kernel_hidden_dim(chosen.value, hidden.shape[-1])
    return chosen


def _valid_rows(ids, ignore_index, num_items):
    """Rows that count: positive/target not ignore_index and in [0, N). An id out of range
    reaches the kernels only when the host check was skipped or deferred; they treat its row
    as ignored, and so does `mean`."""
    valid = ids.clamp(0, num_items - 1) == ids
    return valid & (ids != ignore_index) if 0 <= ignore_index < num_items else valid


def _reduce(row_loss, valid, reduction, row_shape):
    """row_loss [T] (zero at ignored rows) -> the requested reduction; no host sync."""
    if reduction == "none":
        return row_loss.view(row_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def _negative_groups(neg_ids, hidden, pos_ids):
    """neg_ids as [G, K] and the number of consecutive rows sharing each list."""
    rows = pos_ids.numel()
    if neg_ids.dim() == 1:  # [K]: one list for every row
        return neg_ids[None], rows
    if hidden.dim() == 3 and neg_ids.dim() == 2 and neg_ids.shape[0] == hidden.shape[0]:  # [B, K]
        return neg_ids, hidden.shape[1]
    if neg_ids.shape[:-1] == pos_ids.shape:  # [T, K] or [B, L, K]: one list per row
        return neg_ids.reshape(rows, neg_ids.shape[-1]), 1
    accepted = f"[K], {list(pos_ids.shape) + ['K']}" + (f" or [{hidden.shape[0]}, K]" if hidden.dim() == 3 else "")
    raise ValueError(f"neg_ids: expected shape {accepted}, got {tuple(neg_ids.shape)}")


def sampled_softmax_loss(
    hidden: torch.Tensor,
    item_weight: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    *,
    pos_log_q: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    remove_accidental_hits: bool = True,
    temperature: float = 1.0,
    ignore_index: int = 0,
    reduction: Literal["mean", "sum", "none"] = "mean",
    backend: str | Backend = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy of each position's positive against sampled negatives,
    without materializing [T, K] logits (Triton) — see the README for the semantics.

    hidden [T, D] or [B, L, D]; item_weight [N, D]; pos_ids [T] or [B, L]; neg_ids [K]
    (shared), [B, K] (per sequence) or [T, K] / [B, L, K] (per row); log_q tensors have
    the shape of their ids. Returns a float32 scalar, or [T] / [B, L] for reduction="none".
    """
    checks = _front.front_checks(
        backend, "sampled_softmax_loss", hidden, item_weight, pos_ids, neg_ids, pos_log_q, neg_log_q
    )
    if (
        checks is not None
        and type(remove_accidental_hits) is bool
        and type(temperature) in _front.REAL
        and type(ignore_index) is int
        and type(reduction) is str
        and reduction in _front.REDUCTIONS
    ):
        loss, pos_flag, neg_flag = _front.SAMPLED_SOFTMAX_LOSS(
            hidden, item_weight, pos_ids, neg_ids, pos_log_q, neg_log_q, remove_accidental_hits, temperature,
            ignore_index, _front.REDUCTIONS[reduction], *checks,
        )  # fmt: skip
        if loss is not None:  # else declined: the general path below names what is wrong
            if pos_flag is not None:
                defer_error("pos_ids", pos_flag, values_outside("pos_ids", _ids_expected(item_weight.shape[0])))
            if neg_flag is not None:
                defer_error("neg_ids", neg_flag, values_outside("neg_ids", _ids_expected(item_weight.shape[0])))
            return loss
    _check_hidden_and_weight(hidden, item_weight)
    temperature = _check_common(temperature, ignore_index, reduction)
    check_bool("remove_accidental_hits", remove_accidental_hits)
    row_shape, num_items = hidden.shape[:-1], item_weight.shape[0]
    _check_ids("pos_ids", pos_ids, row_shape, hidden.device, num_items, ignore_index)
    check_tensor("neg_ids", neg_ids, dtypes=INDEX_DTYPES, device=hidden.device)
    groups, rows_per_group = _negative_groups(neg_ids, hidden, pos_ids)
    if groups.shape[1] == 0:
        raise ValueError(f"neg_ids: expected at least one negative (K >= 1), got shape {tuple(neg_ids.shape)}")
    _check_ids("neg_ids", neg_ids, neg_ids.shape, hidden.device, num_items)
    pos_log_q = _check_log_q("pos_log_q", pos_log_q, "pos_ids", pos_ids)
    neg_log_q = _check_log_q("neg_log_q", neg_log_q, "neg_ids", neg_ids)

    chosen = _resolve(backend, hidden, "sampled_softmax_loss")
    # Every backend gets contiguous ids (the C++ ops read them through raw pointers).
    pos_flat = pos_ids.reshape(-1).contiguous()
    hidden, item_weight = extension_operands(chosen, hidden, item_weight)
    row_loss, _ = _SAMPLED_OPS[chosen](
        hidden.reshape(-1, hidden.shape[-1]), item_weight, pos_flat, groups.contiguous(),
        None if pos_log_q is None else pos_log_q.reshape(-1),
        None if neg_log_q is None else neg_log_q.reshape(groups.shape),
        rows_per_group, remove_accidental_hits, temperature, ignore_index,
    )  # fmt: skip
    return _reduce(row_loss, _valid_rows(pos_flat, ignore_index, num_items), reduction, row_shape)


def full_softmax_loss(
    hidden: torch.Tensor,
    item_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = 0,
    exclude_items: Sequence[int] = (0,),
    reduction: Literal["mean", "sum", "none"] = "mean",
    backend: str | Backend = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax cross-entropy over the whole catalog, without materializing [T, N]
    logits (Triton). exclude_items are never classes (the padding row by default).

    hidden [T, D] or [B, L, D]; item_weight [N, D]; targets [T] or [B, L]. With
    return_lse, also returns the per-row log-sum-exp (float32, shape of targets).
    """
    checks = _front.front_checks(backend, "full_softmax_loss", hidden, item_weight, targets)
    if (
        checks is not None
        and item_weight.dim() == 2
        and type(temperature) in _front.REAL
        and type(ignore_index) is int
        and type(reduction) is str
        and reduction in _front.REDUCTIONS
        and type(return_lse) is bool
    ):
        try:  # the ids in [0, N), sorted and distinct, and their tensor: cached
            excluded, excluded_ids = excluded_items(exclude_items, item_weight.shape[0], hidden.device)
        except (TypeError, ValueError):  # the general path below names what is wrong
            excluded = None
        if excluded is not None:
            loss, lse, range_flag, excluded_flag = _front.FULL_SOFTMAX_LOSS(
                hidden, item_weight, targets, excluded_ids, len(excluded) > (ignore_index in excluded), temperature,
                ignore_index, _front.REDUCTIONS[reduction], return_lse, *checks,
            )  # fmt: skip
            if loss is not None:  # else declined: the general path below names what is wrong
                if range_flag is not None:
                    defer_error("targets", range_flag, values_outside("targets", _ids_expected(item_weight.shape[0])))
                if excluded_flag is not None:
                    defer_error("targets", excluded_flag, _excluded_target(excluded))
                return (loss, lse) if return_lse else loss
    _check_hidden_and_weight(hidden, item_weight)
    temperature = _check_common(temperature, ignore_index, reduction)
    check_bool("return_lse", return_lse)
    row_shape, num_items = hidden.shape[:-1], item_weight.shape[0]
    _check_ids("targets", targets, row_shape, hidden.device, num_items, ignore_index)
    excluded, excluded_ids = excluded_items(exclude_items, num_items, hidden.device)
    if len(excluded) >= num_items:
        raise ValueError(f"exclude_items: excludes all {num_items} items, leaving no class")
    _check_targets_not_excluded(targets, excluded, excluded_ids, ignore_index)

    chosen = _resolve(backend, hidden, "full_softmax_loss")
    targets_flat = targets.reshape(-1).contiguous()
    hidden, item_weight = extension_operands(chosen, hidden, item_weight)
    row_loss, lse = _FULL_OPS[chosen](
        hidden.reshape(-1, hidden.shape[-1]), item_weight, targets_flat, excluded_ids, temperature, ignore_index
    )
    valid = _valid_rows(targets_flat, ignore_index, num_items)
    loss = _reduce(row_loss, valid, reduction, row_shape)
    if not return_lse:
        return loss
    return loss, lse.view(row_shape)  # 0 at ignored rows: every backend skips them
