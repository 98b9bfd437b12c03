"""Negative samplers: the one source of negatives for every loss (bce, gbce, sampled softmax).

Every sampler is called as `sampler(shape, device=None, generator=None, users=None)` and
returns (ids, log_q) of `shape`, where log_q is the log probability of drawing each id (for
the logQ correction). `users` [shape[0]] names the user of each leading row: samplers whose
draw depends on the user (UnseenSampler) require it, the others ignore it. Sampling is with
replacement, on the requested device, from torch's generator (or the one given), and never
returns the padding item.
"""

from __future__ import annotations

import math

import torch

from .._checks import INDEX_DTYPES, check_real, check_tensor


def _check_shape(shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape: expected non-negative ints, got {shape}")
    return shape


class UniformSampler:
    """Items 0..num_items-1 except padding_idx, each with probability 1 / (num_items - 1)."""

    def __init__(self, num_items: int, padding_idx: int | None = 0):
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 2:
            raise ValueError(f"num_items: expected an int >= 2 (the padding item plus one), got {num_items!r}")
        if padding_idx is not None and not 0 <= padding_idx < num_items:
            raise ValueError(f"padding_idx: expected None or an id in [0, {num_items}), got {padding_idx!r}")
        self.num_items, self.padding_idx = num_items, padding_idx
        self.num_candidates = num_items - (padding_idx is not None)

    def __call__(self, shape, device=None, generator=None, users=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = _check_shape(shape)
        ids = torch.randint(self.num_candidates, shape, device=device, generator=generator)
        if self.padding_idx is not None:
            ids = ids + (ids >= self.padding_idx).long()  # skip over the padding id
        return ids, torch.full(shape, -math.log(self.num_candidates), device=device)


class PopularitySampler:
    """Items with probability proportional to counts ** alpha (the unigram^alpha
    distribution; alpha=0.75 as in word2vec), the padding item never."""

    def __init__(self, counts: torch.Tensor, alpha: float = 1.0, padding_idx: int | None = 0):
        check_tensor("counts", counts, ndim=1, layout="[N]")
        if not counts.is_floating_point() and counts.dtype not in INDEX_DTYPES:
            raise TypeError(f"counts: expected an integer or floating tensor, got {counts.dtype}")
        self.alpha = check_real("alpha", alpha, low=0.0, high=math.inf)
        weights = counts.double().clamp(min=0.0) ** self.alpha
        weights[counts <= 0] = 0.0  # never-seen items stay impossible, also when alpha == 0
        if padding_idx is not None:
            weights[padding_idx] = 0.0
        total = weights.sum()
        if not total > 0:
            raise ValueError("counts: expected at least one positive count outside the padding item")
        self.probs = weights / total  # [N] float64
        self.log_probs = self.probs.log()
        self._cdf = self.probs.cumsum(0)
        self._last_possible = int(weights.nonzero().max())

    def __call__(self, shape, device=None, generator=None, users=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = _check_shape(shape)
        device = torch.device(device) if device is not None else self.probs.device
        if self._cdf.device != device:
            self.probs, self.log_probs, self._cdf = (t.to(device) for t in (self.probs, self.log_probs, self._cdf))
        # Inverse-CDF sampling (torch.multinomial stops at 2**24 categories): the first id
        # whose cdf exceeds u, which is never a zero-probability id. The clamp covers u
        # rounding up to the total.
        u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator) * self._cdf[-1]
        ids = torch.searchsorted(self._cdf, u, right=True).clamp(max=self._last_possible)
        return ids, self.log_probs[ids].float()


class UnseenSampler:
    """Items 1..num_items that the row's user never interacted with, uniformly (the paper's
    negatives for bce). `data` is a SequenceDataset; draws happen where its tensors live (the
    host, for the trainer) and are then moved to `device`."""

    def __init__(self, data):
        self.data, self.keys = data, data.interaction_keys()
        distinct = torch.unique_consecutive(self.keys) // (data.num_items + 1)  # user of each distinct pair
        unseen = data.num_items - torch.bincount(distinct, minlength=data.num_users)  # [U]
        self.log_q = -unseen.clamp(min=1).double().log().float()  # [U]

    def __call__(self, shape, device=None, generator=None, users=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = _check_shape(shape)
        if users is None or users.dim() != 1 or not shape or users.shape[0] != shape[0]:
            got = None if users is None else tuple(users.shape)
            raise ValueError(f"users: the unseen sampler draws per user: expected [shape[0]] users, got {got}")
        ids = self.data.sample_unseen(users, shape[1:], generator=generator, keys=self.keys)
        log_q = self.log_q[users].view(-1, *([1] * (len(shape) - 1))).expand(shape)
        return ids.to(device), log_q.to(device)


def in_batch_negatives(pos_ids: torch.Tensor, ignore_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's positives as one shared negative list [K] (K = non-ignored positions),
    with log_q their empirical log frequency in the batch. Pass remove_accidental_hits=True
    to the loss so that a row's own positive is not its negative. Reads the number of
    non-ignored positions on the host (the list has a data-dependent length)."""
    check_tensor("pos_ids", pos_ids, dtypes=INDEX_DTYPES)
    ids = pos_ids.reshape(-1)
    ids = ids[ids != ignore_index]
    if ids.numel() == 0:
        return ids, torch.empty(0, device=ids.device)
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return ids, (counts[inverse].double() / ids.numel()).log().float()
