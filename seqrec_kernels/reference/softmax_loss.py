"""Reference softmax losses: readable PyTorch that defines what every backend computes.

Op-level contract shared by all backends (see `seqrec_kernels/ops/softmax_loss.py`):
hidden [T, D], weight [N, D]; logit(row, item) = <hidden[row], weight[item]> / temperature
- log_q(item). Rows whose positive/target equals ignore_index have loss 0, LSE 0 and no
gradient (the kernels skip them). Losses and LSEs are float32 (float64 for float64
inputs), per row [T].

Sampled: negatives neg_ids [G, K]; row t uses group t // rows_per_group (G = 1: shared
by all rows; G = B: one list per sequence; G = T: one per row).
loss(t) = logsumexp(pos logit, neg logits except accidental hits) - pos logit.
Full: loss(t) = logsumexp over items not excluded - logit(target).
"""

import math

import torch

from .._checks import accumulation_dtype


def _sampled_logits(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, remove_hits, temperature):
    """Positive logits [T] and negative logits [T, K] (-inf at accidental hits)."""
    safe_pos = pos_ids.clamp(0, weight.shape[0] - 1)  # ignored rows may hold any id
    pos_logits = (hidden * weight[safe_pos]).sum(-1) / temperature
    groups, num_neg = neg_ids.shape
    grouped_hidden = hidden.view(groups, rows_per_group, hidden.shape[1])  # [G, R, D]
    neg_logits = (grouped_hidden @ weight[neg_ids].transpose(1, 2)).reshape(-1, num_neg) / temperature  # [T, K]
    if pos_log_q is not None:
        pos_logits = pos_logits - pos_log_q
    if neg_log_q is not None:
        neg_logits = (neg_logits.view(groups, rows_per_group, num_neg) - neg_log_q[:, None, :]).reshape(-1, num_neg)
    if remove_hits:
        row_neg_ids = neg_ids.repeat_interleave(rows_per_group, dim=0)  # [T, K]
        neg_logits = neg_logits.masked_fill(row_neg_ids == pos_ids[:, None], -math.inf)
    return pos_logits, neg_logits


def sampled_forward(
    hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, remove_hits, temperature, ignore_index
):
    """Per-row loss [T] (0 at ignored rows) and LSE [T]."""
    compute = accumulation_dtype(hidden.dtype)
    pos_logits, neg_logits = _sampled_logits(
        hidden.to(compute), weight.to(compute), pos_ids, neg_ids,
        None if pos_log_q is None else pos_log_q.to(compute),
        None if neg_log_q is None else neg_log_q.to(compute),
        rows_per_group, remove_hits, temperature,
    )  # fmt: skip
    # Every row is computed: the grouped product shares each list's gathered weights, which a
    # ragged subset of rows would not.
    lse = torch.logsumexp(torch.cat([pos_logits[:, None], neg_logits], dim=1), dim=1)
    valid = pos_ids != ignore_index
    return torch.where(valid, lse - pos_logits, 0.0), torch.where(valid, lse, 0.0)


def sampled_backward(
    grad_loss, hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, lse,
    rows_per_group, remove_hits, temperature, ignore_index, deterministic,
):  # fmt: skip
    """Gradients (d hidden [T, D], d weight [N, D]); the logits are recomputed. The
    reference follows torch.use_deterministic_algorithms; `deterministic` is for kernels."""
    compute = accumulation_dtype(hidden.dtype)
    h, w = hidden.to(compute), weight.to(compute)
    pos_logits, neg_logits = _sampled_logits(
        h, w, pos_ids, neg_ids,
        None if pos_log_q is None else pos_log_q.to(compute),
        None if neg_log_q is None else neg_log_q.to(compute),
        rows_per_group, remove_hits, temperature,
    )  # fmt: skip
    # d loss / d logit = softmax - onehot(positive), scaled by the row's upstream gradient.
    # Ignored rows (LSE 0) are masked before the scale: exp(logit - 0) may overflow, and inf * 0 is NaN.
    valid = pos_ids != ignore_index
    row_scale = torch.where(valid, grad_loss.to(compute), 0.0) / temperature
    pos_coef = torch.where(valid, torch.exp(pos_logits - lse) - 1.0, 0.0) * row_scale  # [T]
    neg_coef = torch.where(valid[:, None], torch.exp(neg_logits - lse[:, None]), 0.0) * row_scale[:, None]  # [T, K]
    groups, num_neg = neg_ids.shape
    safe_pos = pos_ids.clamp(0, w.shape[0] - 1)
    grouped_coef = neg_coef.view(groups, rows_per_group, num_neg)  # [G, R, K]
    d_hidden = pos_coef[:, None] * w[safe_pos] + (grouped_coef @ w[neg_ids]).reshape(h.shape)
    d_weight = torch.zeros_like(w)
    d_weight.index_add_(0, safe_pos, pos_coef[:, None] * h)
    neg_grads = grouped_coef.transpose(1, 2) @ h.view(groups, rows_per_group, h.shape[1])  # [G, K, D]
    d_weight.index_add_(0, neg_ids.reshape(-1), neg_grads.reshape(-1, h.shape[1]))
    return d_hidden.to(hidden.dtype), d_weight.to(weight.dtype)


def _full_logits(hidden, weight, excluded_ids, temperature):
    # In place on the one [T, N] buffer: each pass over it is the cost on a CPU.
    logits = (hidden @ weight.T).div_(temperature)  # [T, N]
    return logits.index_fill_(1, excluded_ids.long(), -math.inf)


def _counted_rows(targets, ignore_index):
    """Indices [V] of the rows whose target is not ignore_index. nonzero() reads V on the
    host (a sync): this CPU-first reference accepts it to compute no logits for ignored rows."""
    return (targets != ignore_index).nonzero()[:, 0]


def full_forward(hidden, weight, targets, excluded_ids, temperature, ignore_index):
    """Per-row loss [T] and LSE [T] over the items not excluded (both 0 at ignored rows)."""
    compute = accumulation_dtype(hidden.dtype)
    rows = _counted_rows(targets, ignore_index)
    logits = _full_logits(hidden[rows].to(compute), weight.to(compute), excluded_ids, temperature)  # [V, N]
    lse = torch.logsumexp(logits, dim=1)
    target_logits = logits.gather(1, targets[rows].long()[:, None])[:, 0]
    zeros = hidden.new_zeros(hidden.shape[0], dtype=compute)
    return zeros.index_copy(0, rows, lse - target_logits), zeros.index_copy(0, rows, lse)


def full_backward(grad_loss, hidden, weight, targets, excluded_ids, lse, temperature, ignore_index):
    """Gradients (d hidden [T, D], d weight [N, D]); the logits are recomputed."""
    compute = accumulation_dtype(hidden.dtype)
    rows = _counted_rows(targets, ignore_index)
    h, w = hidden[rows].to(compute), weight.to(compute)  # [V, D], [N, D]
    probs = _full_logits(h, w, excluded_ids, temperature).sub_(lse[rows, None]).exp_()  # [V, N]
    target_ids = targets[rows].long()[:, None]
    probs.scatter_add_(1, target_ids, probs.new_full(target_ids.shape, -1.0))  # softmax - onehot(target)
    coef = probs.mul_((grad_loss[rows].to(compute) / temperature)[:, None])
    d_hidden = hidden.new_zeros(hidden.shape, dtype=compute).index_copy_(0, rows, coef @ w)
    return d_hidden.to(hidden.dtype), (coef.T @ h).to(weight.dtype)
