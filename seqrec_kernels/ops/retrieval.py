"""topk_items / target_ranks: retrieval over the whole catalog without a [B, N] score matrix.

Every backend implements `seqrec::topk_items_<backend>` and `seqrec::target_ranks_<backend>`
(see `seqrec_kernels/reference/retrieval.py` for the contract): the reference and Triton.
The C++/CUDA extension has no retrieval kernels (README: Retrieval), so `cuda` and `cpp`
raise. No gradients: these ops serve and evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, accumulation_dtype, check_tensor, check_values
from .._limits import check_kernel_hidden_dim, check_kernel_k
from ..backends import Backend, resolve_for
from ._library import define_forward_ops, excluded_items

_TOPK_SCHEMA = "(Tensor hidden, Tensor weight, Tensor exclude, Tensor excluded_ids, int k) -> (Tensor, Tensor)"
_RANKS_SCHEMA = "(Tensor hidden, Tensor weight, Tensor targets, Tensor exclude, Tensor excluded_ids) -> Tensor"


def _fake_topk(hidden, weight, exclude, excluded_ids, k):
    """Scores [B, k] in the accumulation dtype, ids [B, k] int64."""
    scores = hidden.new_empty((hidden.shape[0], k), dtype=accumulation_dtype(hidden.dtype))
    return scores, hidden.new_empty((hidden.shape[0], k), dtype=torch.int64)


def _fake_ranks(hidden, weight, targets, exclude, excluded_ids):
    return hidden.new_empty(hidden.shape[0], dtype=torch.int64)


_TOPK_OPS = define_forward_ops("topk_items", _TOPK_SCHEMA, functions=("retrieval", "topk_forward"), fake=_fake_topk)
_RANKS_OPS = define_forward_ops(
    "target_ranks", _RANKS_SCHEMA, functions=("retrieval", "ranks_forward"), fake=_fake_ranks
)


def _check_ids(name, ids, shape_text, ndim, rows, num_items, device):
    """Integer item ids [B] or [B, M] in [0, N) (checked on the host when values may be read)."""
    check_tensor(name, ids, ndim=ndim, layout=shape_text, dtypes=INDEX_DTYPES, device=device)
    if ids.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows (the rows of hidden), got shape {tuple(ids.shape)}")
    check_values(name, ids, 0, num_items - 1, f"item ids in [0, {num_items}) (N)")


def _checked_inputs(hidden, item_weight, exclude, exclude_items):
    """Validates the arguments both functions share; returns (exclude [B, M], excluded ids [E] int32)."""
    check_tensor("hidden", hidden, ndim=2, layout="[B, D]", dtypes=FLOAT_DTYPES)
    check_tensor("item_weight", item_weight, ndim=2, layout="[N, D]", device=hidden.device)
    if item_weight.dtype != hidden.dtype:
        raise TypeError(f"item_weight: expected dtype {hidden.dtype} (the dtype of hidden), got {item_weight.dtype}")
    if item_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"item_weight: expected D={hidden.shape[1]} columns (the last dimension of hidden), "
            f"got shape {tuple(item_weight.shape)}"
        )
    num_items = item_weight.shape[0]
    if num_items == 0:
        raise ValueError("item_weight: expected at least one item row, got shape (0, D)")
    if exclude is None:
        exclude = torch.zeros(hidden.shape[0], 0, dtype=torch.int64, device=hidden.device)
    _check_ids("exclude", exclude, "[B, M] (0 = padding)", 2, hidden.shape[0], num_items, hidden.device)
    if isinstance(exclude_items, (str, bytes)) or not isinstance(exclude_items, Sequence):
        raise TypeError(f"exclude_items: expected a sequence of item ids, got {type(exclude_items).__name__}")
    _, excluded_ids = excluded_items(exclude_items, num_items, hidden.device)
    return exclude.contiguous(), excluded_ids


def _resolve(backend, hidden, op_name) -> Backend:
    chosen = resolve_for(backend, op_name, "hidden", hidden)
    if chosen not in (Backend.REFERENCE, Backend.TRITON):
        raise ValueError(
            f"backend: {chosen.value!r} has no {op_name}: the C++/CUDA extension does not implement retrieval "
            "(the README says why); use 'triton' or 'reference'"
        )
    check_kernel_hidden_dim(chosen.value, hidden.shape[1])
    return chosen


def topk_items(
    hidden: torch.Tensor,
    item_weight: torch.Tensor,
    k: int,
    *,
    exclude: torch.Tensor | None = None,
    exclude_items: Sequence[int] = (0,),
    backend: str | Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k items of highest inner product <hidden[b], item_weight[j]> per row, without a
    [B, N] score matrix.

    hidden [B, D]; item_weight [N, D] (same dtype); exclude [B, M] int ids removed from row b
    (e.g. its history; 0 entries are padding); exclude_items: ids removed from every row
    (the padding item by default). Returns (scores [B, k], ids [B, k] int64): highest score
    first, equal scores by the lower id; rows with fewer than k candidates end with score
    -inf and id -1. Scores are float32 (float64 for float64 inputs on the reference).
    """
    exclude, excluded_ids = _checked_inputs(hidden, item_weight, exclude, exclude_items)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k}")
    chosen = _resolve(backend, hidden, "topk_items")
    check_kernel_k(chosen.value, k)
    return _TOPK_OPS[chosen](hidden.detach(), item_weight.detach(), exclude, excluded_ids, k)


def target_ranks(
    hidden: torch.Tensor,
    item_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    exclude: torch.Tensor | None = None,
    exclude_items: Sequence[int] = (0,),
    backend: str | Backend = "auto",
) -> torch.Tensor:
    """The 0-based rank of each row's target among the candidates (the items neither in
    exclude_items nor in the row's exclude), in one streaming pass: the number of candidates
    other than the target that score strictly higher than it. Ties count in the target's
    favour (a target tied with others ranks first among them), as metrics.py's ranks do.
    The target's own score counts even when the target is excluded (a repeated item).

    hidden [B, D]; item_weight [N, D]; targets [B] int ids in [0, N); exclude and
    exclude_items as for topk_items. Returns [B] int64.
    """
    exclude, excluded_ids = _checked_inputs(hidden, item_weight, exclude, exclude_items)
    _check_ids("targets", targets, "[B]", 1, hidden.shape[0], item_weight.shape[0], hidden.device)
    chosen = _resolve(backend, hidden, "target_ranks")
    return _RANKS_OPS[chosen](hidden.detach(), item_weight.detach(), targets.contiguous(), exclude, excluded_ids)
