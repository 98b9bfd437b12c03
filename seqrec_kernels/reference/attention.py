"""Reference attention: readable PyTorch that defines what every backend computes.

Op-level contract shared by all backends (see `seqrec_kernels/ops/attention.py`):
q, k, v are [B, H, L, D]; sequence s occupies rows seq_start[s] .. seq_start[s] +
seq_len[s] - 1 of batch row `s` when B == S (padded form) or of batch row 0 when B == 1
(packed form). Query i sees key j iff both belong to the same sequence and (not causal or
pos(j) <= pos(i)), positions counted from the sequence's first token.
"""

import math

import torch

from .dropout import keep_mask, row_hash


def _token_layout(seq_start, seq_len, batch, num_rows):
    """Sequence id ([B, L], -1 for padding) and position within its sequence ([B, L])."""
    num_seqs = seq_len.shape[0]
    rows = torch.arange(num_rows, device=seq_len.device)
    start = seq_start.long()[:, None]
    member = (rows >= start) & (rows < start + seq_len.long()[:, None])  # [S, L]
    seq_ids = torch.arange(num_seqs, device=seq_len.device)[:, None]
    if batch == num_seqs:  # padded: batch row b holds sequence b
        seq_id = torch.where(member, seq_ids, -1)
    else:  # packed: the one batch row holds every sequence
        seq_id = torch.where(member, seq_ids, -1).amax(0, keepdim=True)
    position = rows - seq_start.long()[seq_id.clamp(min=0)]
    return seq_id, position


def _visible(seq_id, position, causal):
    """[B, L, L] bool: query i (dim 1) sees key j (dim 2)."""
    same_seq = (seq_id[:, :, None] == seq_id[:, None, :]) & (seq_id[:, :, None] >= 0)
    if not causal:
        return same_seq
    return same_seq & (position[:, None, :] <= position[:, :, None])


def _dropout_multiplier(seq_id, position, num_heads, max_seqlen, dropout_p, seed, dtype):
    """[B, H, L, L] keep-mask / (1 - p) in `dtype`, or None without dropout."""
    if dropout_p == 0.0:
        return None
    heads = torch.arange(num_heads, device=seq_id.device)[None, :, None]
    row_key = (seq_id.clamp(min=0)[:, None, :] * num_heads + heads) * max_seqlen
    row_key = row_key + position[:, None, :]  # [B, H, L]
    keep = keep_mask(row_hash(seed, row_key)[..., None], position[:, None, None, :], dropout_p)
    return keep.to(dtype) / (1.0 - dropout_p)


def _probabilities(q, k, seq_start, seq_len, causal, scale):
    """Softmax probabilities [B, H, L, L] in the compute dtype, and the row LSE [B, H, L]
    (-inf for rows that see no key, whose probabilities are all zero)."""
    seq_id, position = _token_layout(seq_start, seq_len, q.shape[0], q.shape[2])
    visible = _visible(seq_id, position, causal)[:, None]  # [B, 1, L, L]
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    sees_any = torch.isfinite(lse)[..., None]
    probs = torch.softmax(torch.where(sees_any, scores, 0.0), dim=-1) * sees_any
    return probs, lse, seq_id, position


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like(template, value):
    """`value` in the dtype and memory layout of `template` (the op contract for outputs)."""
    return torch.empty_like(template).copy_(value)


def attention_forward(q, k, v, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed):
    """Returns out [B, H, L, D] (dtype of q) and lse [B, H, L] (float32; float64 for float64)."""
    compute = _compute_dtype(q.dtype)
    qc, kc, vc = (t.to(compute) for t in (q, k, v))
    probs, lse, seq_id, position = _probabilities(qc, kc, seq_start, seq_len, causal, scale)
    multiplier = _dropout_multiplier(seq_id, position, q.shape[1], max_seqlen, dropout_p, dropout_seed, compute)
    if multiplier is not None:
        probs = probs * multiplier
    return _like(q, probs @ vc), lse


def attention_backward(dout, q, k, v, out, lse, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed):
    """Gradients (dq, dk, dv); the probabilities are recomputed from q and k (the saved
    out and lse are part of the op signature for the kernels, not needed here)."""
    compute = _compute_dtype(q.dtype)
    qc, kc, vc, doc = (t.to(compute) for t in (q, k, v, dout))
    probs, _, seq_id, position = _probabilities(qc, kc, seq_start, seq_len, causal, scale)
    multiplier = _dropout_multiplier(seq_id, position, q.shape[1], max_seqlen, dropout_p, dropout_seed, compute)
    dropped = probs if multiplier is None else probs * multiplier
    dv = dropped.transpose(-1, -2) @ doc
    dprobs = doc @ vc.transpose(-1, -2)  # [B, H, L, L]
    if multiplier is not None:
        dprobs = dprobs * multiplier
    dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    dq = (dscores @ kc) * scale
    dk = (dscores.transpose(-1, -2) @ qc) * scale
    return _like(q, dq), _like(k, dk), _like(v, dv)
