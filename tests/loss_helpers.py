"""Naive softmax losses the tests trust, and the one helper that checks a backend against them.

The naive functions are written from the semantics alone: explicit per-row candidate
lists, a masked log-sum-exp, autograd for gradients. In float64 they are the truth; in a
low-precision dtype they are the baseline of the tolerance rule (error <= 2x, 3x for
gradients, the naive same-dtype error, plus a floor), as for attention.
"""

import math

import torch

from attention_helpers import assert_flash_rule
from seqrec_kernels import full_softmax_loss, sampled_softmax_loss


def per_row_negatives(neg_ids, row_shape):
    """Any accepted neg_ids shape -> [T, K]: the negatives each row uses."""
    num_rows = math.prod(row_shape)
    if neg_ids.dim() == 1:
        return neg_ids.expand(num_rows, -1)
    if len(row_shape) == 2 and neg_ids.dim() == 2:  # [B, K] per sequence
        return neg_ids.repeat_interleave(row_shape[1], dim=0)
    return neg_ids.reshape(num_rows, -1)


def naive_sampled(hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, remove_hits, temperature, ignore_index):
    """Per-row loss [T] in hidden's dtype."""
    h = hidden.reshape(-1, hidden.shape[-1])
    pos = pos_ids.reshape(-1)
    negs = per_row_negatives(neg_ids, pos_ids.shape)  # [T, K]
    valid = pos != ignore_index
    candidates = torch.cat([torch.where(valid, pos, 0)[:, None], negs], dim=1)  # [T, 1 + K]
    logits = (h[:, None, :] * weight[candidates]).sum(-1) / temperature
    if pos_log_q is not None:
        logits[:, 0] = logits[:, 0] - pos_log_q.reshape(-1)
    if neg_log_q is not None:
        logits[:, 1:] = logits[:, 1:] - per_row_negatives(neg_log_q, pos_ids.shape)
    in_denominator = torch.ones_like(candidates, dtype=torch.bool)
    if remove_hits:
        in_denominator[:, 1:] = negs != pos[:, None]
    lse = torch.logsumexp(logits.masked_fill(~in_denominator, -math.inf), dim=1)
    return torch.where(valid, lse - logits[:, 0], 0.0)


def naive_full(hidden, weight, targets, excluded, temperature, ignore_index):
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    logits = h @ weight.T / temperature
    is_excluded = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    is_excluded[list(excluded)] = True
    lse = torch.logsumexp(logits.masked_fill(is_excluded, -math.inf), dim=1)
    valid = t != ignore_index
    return torch.where(valid, lse - logits.gather(1, torch.where(valid, t, 0)[:, None])[:, 0], 0.0)


def _loss_and_grads(fn, hidden, weight, dout):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = fn(hidden, weight).reshape(-1)
    grads = torch.autograd.grad(loss, (hidden, weight), dout.to(loss.dtype)) if loss.numel() else (
        torch.zeros_like(hidden), torch.zeros_like(weight))  # fmt: skip
    return loss.detach(), grads


def check_loss_against_truth(ours, naive, hidden, weight, floor_scale=1.0):
    """ours(hidden, weight) and naive(hidden, weight) give per-row losses; compares the
    losses and both gradients of ours with the float64 truth by the tolerance rule."""
    dtype = hidden.dtype
    num_rows = math.prod(hidden.shape[:-1])
    generator = torch.Generator().manual_seed(num_rows)  # reproducible when hypothesis replays
    dout = torch.rand(num_rows, dtype=torch.float64, generator=generator).to(hidden.device) + 0.5  # never zero
    loss, grads = _loss_and_grads(ours, hidden, weight, dout)
    truth_loss, truth_grads = _loss_and_grads(naive, hidden.double(), weight.double(), dout)
    base_loss, base_grads = _loss_and_grads(naive, hidden, weight, dout)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_flash_rule("loss", loss, truth_loss, base_loss, dtype, 2, floor_scale)
    # A gradient sums products of softmax weights and the other operand (d hidden: item rows;
    # d item_weight: hidden rows): its rounding is relative to that operand's magnitude, even
    # where the terms cancel (duplicate items in a tiny catalog) and the truth is near 0.
    operand_scale = [max(1.0, weight.abs().max().item()), max(1.0, hidden.abs().max().item())]
    for name, g, tg, bg, scale in zip(("d hidden", "d item_weight"), grads, truth_grads, base_grads, operand_scale):
        assert g.dtype == dtype
        assert_flash_rule(name, g, tg, bg, dtype, 3, floor_scale * scale)


def sampled_pair(backend, pos_ids, neg_ids, pos_log_q=None, neg_log_q=None, remove_hits=True, temperature=1.0,
                 ignore_index=0):  # fmt: skip
    """(ours, naive) per-row loss functions of (hidden, weight) for check_loss_against_truth."""
    options = dict(remove_accidental_hits=remove_hits, temperature=temperature, ignore_index=ignore_index)

    def ours(hidden, weight):
        return sampled_softmax_loss(hidden, weight, pos_ids, neg_ids, pos_log_q=pos_log_q, neg_log_q=neg_log_q,
                                    reduction="none", backend=backend, **options)  # fmt: skip

    def naive(hidden, weight):
        cast = [None if t is None else t.to(hidden.dtype) for t in (pos_log_q, neg_log_q)]
        return naive_sampled(hidden, weight, pos_ids, neg_ids, *cast, remove_hits, temperature, ignore_index)

    return ours, naive


def full_pair(backend, targets, excluded=(0,), temperature=1.0, ignore_index=0):
    def ours(hidden, weight):
        return full_softmax_loss(hidden, weight, targets, exclude_items=excluded, temperature=temperature,
                                 ignore_index=ignore_index, reduction="none", backend=backend)  # fmt: skip

    def naive(hidden, weight):
        return naive_full(hidden, weight, targets, excluded, temperature, ignore_index)

    return ours, naive
