"""Reference retrieval over the whole catalog: readable PyTorch that defines what every
backend computes, in item chunks so that no [B, N] score matrix exists.

Op-level contract shared by all backends (see `seqrec_kernels/ops/retrieval.py`):
hidden [B, D], weight [N, D]; score(b, j) = <hidden[b], weight[j]>, computed in
accumulation_dtype (float32 for 16-bit inputs, float64 for float64). Item j is a candidate
of row b unless it is in excluded_ids [E] (every row) or in exclude[b] ([B, M] item ids;
entries equal to 0 are padding and exclude nothing).
- topk: scores [B, k] (accumulation dtype) and ids [B, k] int64 of the k candidates with
  the highest scores, highest first, equal scores by the lower id; rows with fewer than k
  candidates end with score -inf and id -1.
- ranks: [B] int64, the number of candidates j != targets[b] whose score is strictly
  higher than the target's (the target's own score counts even when it is excluded).
Peak extra memory is O(B * (C + k)) for chunks of C = chunk_items(B) items, whatever N.
"""

import math

import torch

from .._checks import accumulation_dtype, values_checkable

# Scores per chunk: B * C stays at or under this (16 MiB in float32), so memory does not grow with N.
CHUNK_SCORES = 1 << 22


def chunk_items(rows: int) -> int:
    """Items per chunk for `rows` rows: a multiple of 256, so that every chunk but the last
    has a whole number of vector widths (BLAS then scores an item alike in any chunk)."""
    return max(256, CHUNK_SCORES // max(rows, 1) // 256 * 256)


def _scored_chunks(hidden, weight, exclude, excluded_ids):
    """(first item id, scores [B, C]) per chunk of items, in id order; excluded items score -inf."""
    compute = accumulation_dtype(hidden.dtype)
    h = hidden.to(compute)
    step = chunk_items(h.shape[0])
    # [B, M + E] the items each row excludes; exclude's zeros are padding, excluded_ids' are item 0.
    excluded = torch.cat([exclude.long(), excluded_ids.long().expand(h.shape[0], -1)], dim=1)
    every_row = torch.ones(h.shape[0], excluded_ids.numel(), dtype=torch.bool, device=h.device)
    real = torch.cat([exclude != 0, every_row], dim=1)
    for start in range(0, weight.shape[0], step):
        scores = h @ weight[start : start + step].to(compute).T  # [B, C]
        local = excluded - start
        inside = real & (local >= 0) & (local < scores.shape[1])
        # A minimum with +inf leaves the column as it is: entries outside the chunk change nothing.
        infinity = torch.where(inside, -math.inf, math.inf).to(compute)
        scores.scatter_reduce_(1, local.clamp(0, scores.shape[1] - 1), infinity, reduce="amin")
        yield start, scores


def _best(scores, ids, k):
    """The k best entries of each row of scores / ids [B, W] (W >= k): highest score first,
    equal scores by the lower id. Along each row, entries of equal score must come in
    increasing id order."""
    top, at = scores.topk(k, dim=1)  # the right scores; of those tied at the k-th, maybe not the lowest ids
    kth = top[:, -1:]
    tied_taken = (top == kth).sum(1, dtype=torch.int32)
    # Reading the flag is a host sync; where none is allowed (CUDA graph capture), always repair.
    if not values_checkable() or bool(((scores == kth).sum(1, dtype=torch.int32) > tied_taken).any()):
        # More entries tie at the k-th score than places are left: take the first of them along the row.
        tied = scores == kth
        keep = (scores > kth) | (tied & (tied.cumsum(1) <= tied_taken[:, None]))
        earlier = torch.arange(scores.shape[1], 0, -1, device=scores.device)  # larger for earlier entries
        at = torch.where(keep, earlier, 0).topk(k, dim=1).indices
    top, chosen = scores.gather(1, at), ids.gather(1, at)
    by_id = chosen.sort(dim=1, stable=True).indices
    top, chosen = top.gather(1, by_id), chosen.gather(1, by_id)
    by_score = top.sort(dim=1, descending=True, stable=True).indices  # stable: equal scores stay by id
    return top.gather(1, by_score), chosen.gather(1, by_score)


def topk_forward(hidden, weight, exclude, excluded_ids, k):
    """(scores [B, k], ids [B, k]): each chunk's best k, merged into the running best k."""
    rows = hidden.shape[0]
    best_scores = torch.full((rows, k), -math.inf, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
    best_ids = torch.full((rows, k), -1, dtype=torch.int64, device=hidden.device)
    for start, scores in _scored_chunks(hidden, weight, exclude, excluded_ids):
        ids = torch.arange(start, start + scores.shape[1], device=hidden.device).expand_as(scores)
        top, chosen = _best(scores, ids, min(k, scores.shape[1]))
        chosen = chosen.masked_fill(top == -math.inf, -1)  # only excluded items score -inf
        # The running best precede the chunk and have lower ids: equal scores stay in id order.
        best_scores, best_ids = _best(torch.cat([best_scores, top], 1), torch.cat([best_ids, chosen], 1), k)
    return best_scores, best_ids


def ranks_forward(hidden, weight, targets, exclude, excluded_ids):
    """[B] candidates scoring strictly above the target. Two passes over the chunks: the
    target's score is taken from the very product that scores it as a candidate, so that
    it is compared with values of one computation (exact ties stay ties)."""
    rows = hidden.shape[0]
    target_scores = torch.zeros(rows, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
    targets = targets.long()
    no_exclusions = exclude[:, :0], excluded_ids[:0]  # the target's score counts even when it is excluded
    for start, scores in _scored_chunks(hidden, weight, *no_exclusions):
        local = targets - start
        inside = (local >= 0) & (local < scores.shape[1])
        target_scores = torch.where(inside, scores.gather(1, local.clamp(0, scores.shape[1] - 1)[:, None])[:, 0],
                                    target_scores)  # fmt: skip
    ranks = torch.zeros(rows, dtype=torch.int64, device=hidden.device)
    for _, scores in _scored_chunks(hidden, weight, exclude, excluded_ids):
        ranks += (scores > target_scores[:, None]).sum(1)  # the target itself is not above its own score
    return ranks
