"""Naive softmax losses the tests trust, and the one helper that checks a backend against them.

The naive functions are written from the semantics alone: explicit per-row candidate
lists, a masked log-sum-exp, autograd for gradients. In float64 they are the truth; in the
op's accumulation dtype they are the baseline of the tolerance rule (error <= 2x, 3x for
gradients, the naive error, plus a floor of a few ulps of the truth's scale), as for
attention (attention_helpers.assert_flash_rule). The op contract accumulates half inputs
in float32 (the loss and LSE are float32), so for float16/bfloat16 inputs the naive
baseline is float32 math on those same inputs, its gradients rounded to the input dtype:
naive bfloat16 logits are meaningless at low temperatures (a logit of 80 rounds by 0.25,
every probability is off) and a rule built on them accepts a kernel that returns zeros.
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
    losses and both gradients of ours with the float64 truth by the tolerance rule.
    naive.temperature (set by sampled_pair and full_pair; else 1) bounds the gradients'
    terms. floor_scale widens the floor where a backend's summation order needs it (a serial
    C++ sum over a long hidden dim); it must stay small: the rule refuses a floor that would
    accept zeros."""
    dtype = hidden.dtype
    num_rows = math.prod(hidden.shape[:-1])
    generator = torch.Generator().manual_seed(num_rows)  # reproducible when hypothesis replays
    dout = torch.rand(num_rows, dtype=torch.float64, generator=generator).to(hidden.device) + 0.5  # never zero
    loss, grads = _loss_and_grads(ours, hidden, weight, dout)
    truth_loss, truth_grads = _loss_and_grads(naive, hidden.double(), weight.double(), dout)
    accumulation = torch.float64 if dtype == torch.float64 else torch.float32
    base_loss, base_grads = _loss_and_grads(naive, hidden.to(accumulation), weight.to(accumulation), dout)
    base_grads = [g.to(dtype) for g in base_grads]  # the gradients' own rounding, as the kernels return them
    assert loss.dtype == accumulation
    # A row's loss is lse - its target's logit: two logit-sized terms, whose rounding does not
    # cancel with them (a bound on every logit: the largest row norms' product / temperature).
    temperature = getattr(naive, "temperature", 1.0)
    norms = [t.double().norm(dim=-1).max().item() if t.numel() else 0.0 for t in (hidden, weight)]
    logit_bound = norms[0] * norms[1] / temperature
    assert_flash_rule("loss", loss, truth_loss, base_loss, accumulation, 2, floor_scale, logit_bound)
    # A gradient sums terms dout x (softmax - one-hot) x the other operand / temperature, each
    # at most the bound below: its floor is relative to the larger of its true values and that
    # bound (the terms cancel to a near-zero truth when a row's candidates are all one item).
    term_bounds = [dout.max().item() * operand.abs().max().item() / temperature for operand in (weight, hidden)]
    for name, g, tg, bg, bound in zip(("d hidden", "d item_weight"), grads, truth_grads, base_grads, term_bounds):
        assert g.dtype == dtype
        assert_flash_rule(name, g, tg, bg, dtype, 3, floor_scale, bound)


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

    naive.temperature = temperature  # the gradients' floor needs it (check_loss_against_truth)
    return ours, naive


def full_pair(backend, targets, excluded=(0,), temperature=1.0, ignore_index=0):
    def ours(hidden, weight):
        return full_softmax_loss(hidden, weight, targets, exclude_items=excluded, temperature=temperature,
                                 ignore_index=ignore_index, reduction="none", backend=backend)  # fmt: skip

    def naive(hidden, weight):
        return naive_full(hidden, weight, targets, excluded, temperature, ignore_index)

    naive.temperature = temperature
    return ours, naive
