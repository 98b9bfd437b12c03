"""Reference attention: readable PyTorch that defines what every backend computes.

Op-level contract shared by all backends (see `seqrec_kernels/ops/attention.py`):
q, k, v are [B, H, L, D]; sequence s occupies rows seq_start[s] .. seq_start[s] +
seq_len[s] - 1 of batch row `s` when B == S (padded form) or of batch row 0 when B == 1
(packed form; its sequences in row order and end to end, as cu_seqlens gives them: the
kernels write the rows before the first and after the last themselves). Query i sees key
j iff both belong to the same sequence and (not causal or pos(j) <= pos(i)), positions
counted from the sequence's first token. Rows that belong to no sequence output zeros,
get zero gradients and have LSE -inf.

The math runs on blocks of sequences, [N, H, L_b, D] batches with one sequence per batch
row: the padded input is one such block as it is; the packed input is cut into a few
blocks of sequences of similar length, so its cost grows with the number of sequences,
not with the square of the packed length T.
"""

import math
from collections import defaultdict
from typing import NamedTuple

import torch

from .._checks import accumulation_dtype
from .dropout import keep_mask, row_hash


class _Block(NamedTuple):
    """Sequences computed together as one [N, H, L_b, D] batch, one sequence per batch row."""

    seq_id: torch.Tensor  # [N, L_b] the sequence (its index in seq_len) of each row, -1 for rows of none
    position: torch.Tensor  # [N, L_b] position within that sequence
    rows: torch.Tensor | None = None  # [N, L_b] the packed input's row each block row holds; None: padded input
    real_rows: torch.Tensor | None = None  # [R] flat indices (into N * L_b) of the rows of a sequence

    def gather(self, t):
        """[B, H, L, ...] input -> [N, H, L_b, ...] rows of this block."""
        if self.rows is None:
            return t
        return t[0][:, self.rows].transpose(0, 1)  # [H, T, ...] -> [H, N, L_b, ...] -> [N, H, L_b, ...]

    def scatter(self, dest, values):
        """Writes the sequence rows of `values` [N, H, L_b, ...] into `dest` [B, H, L, ...]."""
        if self.rows is None:
            dest.copy_(values)
            return
        flat = values.transpose(0, 1).flatten(1, 2)  # [H, N * L_b, ...]
        dest[0].index_copy_(1, self.rows.flatten()[self.real_rows], flat.index_select(1, self.real_rows))


def _padded_block(seq_start, seq_len, num_rows):
    """The padded input [S, H, L, D] as one block: row b holds sequence b."""
    rows = torch.arange(num_rows, device=seq_len.device)[None, :]  # [1, L]
    start = seq_start.long()[:, None]  # [S, 1]
    member = (rows >= start) & (rows < start + seq_len.long()[:, None])  # [S, L]
    seq_ids = torch.arange(seq_len.shape[0], device=seq_len.device)[:, None]
    return _Block(torch.where(member, seq_ids, -1), rows - start)


def _bucket_length(length, max_seqlen):
    """A sequence's padded length in the packed form: 4, 16, 64, ... (at most max_seqlen, never
    below the length itself: direct op calls are not validated). Few buckets, because each
    costs ~40 small ops; at most 4x the rows, because the cost grows with their square."""
    padded = 4
    while padded < length:
        padded *= 4
    return max(length, min(padded, max_seqlen))


def _packed_blocks(seq_start, seq_len, max_seqlen):
    """The packed input [1, H, T, D] as blocks: sequences bucketed by _bucket_length, each
    padded on the right to its bucket's length. Sequences of length 0 are in no block. The
    lengths are read on the host, a sync that is fine here: the reference is the CPU path
    (the kernels never read them on the host)."""
    buckets = defaultdict(list)  # padded length -> sequence ids
    for seq, length in enumerate(seq_len.tolist()):
        if length > 0:
            buckets[_bucket_length(length, max_seqlen)].append(seq)
    blocks = []
    for length, seqs in sorted(buckets.items()):
        seq_ids = torch.tensor(seqs, device=seq_len.device)[:, None]  # [N, 1]
        position = torch.arange(length, device=seq_len.device).expand(len(seqs), length)  # [N, L_b]
        start = seq_start.long()[seq_ids]  # [N, 1]
        real = position < seq_len.long()[seq_ids]  # [N, L_b]
        # Rows past a sequence's end read its first row; they belong to no sequence.
        rows = torch.where(real, start + position, start)
        blocks.append(_Block(torch.where(real, seq_ids, -1), position, rows, real.flatten().nonzero().squeeze(1)))
    return blocks


def _blocks(seq_start, seq_len, batch, num_rows, max_seqlen):
    """The padded form (B == S, which includes B == S == 1) as one block, else the packed form's blocks."""
    if batch == seq_len.shape[0]:
        return [_padded_block(seq_start, seq_len, num_rows)]
    return _packed_blocks(seq_start, seq_len, max_seqlen)


def _visible(seq_id, position, causal):
    """[N, L, L] bool: query i (dim 1) sees key j (dim 2)."""
    same_seq = (seq_id[:, :, None] == seq_id[:, None, :]) & (seq_id[:, :, None] >= 0)
    if not causal:
        return same_seq
    return same_seq & (position[:, None, :] <= position[:, :, None])


def _dropout_multiplier(seq_id, position, num_heads, max_seqlen, dropout_p, seed, dtype):
    """[N, H, L, L] keep-mask / (1 - p) in `dtype`, or None without dropout."""
    if dropout_p == 0.0:
        return None
    heads = torch.arange(num_heads, device=seq_id.device)[None, :, None]
    row_key = (seq_id.clamp(min=0)[:, None, :] * num_heads + heads) * max_seqlen
    row_key = row_key + position[:, None, :]  # [N, H, L]
    keep = keep_mask(row_hash(seed, row_key)[..., None], position[:, None, None, :], dropout_p)
    return keep.to(dtype) / (1.0 - dropout_p)


def _probabilities(q, k, seq_id, position, causal, scale):
    """Softmax probabilities [N, H, L, L] of q, k [N, H, L, D] in their dtype, and the row
    LSE [N, H, L] (-inf for rows that see no key, whose probabilities are all zero);
    seq_id, position [N, L] describe the rows."""
    visible = _visible(seq_id, position, causal)[:, None]  # [N, 1, L, L]
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    sees_any = torch.isfinite(lse)[..., None]
    probs = torch.softmax(torch.where(sees_any, scores, 0.0), dim=-1) * sees_any
    return probs, lse


def _like(template, value):
    """`value` in the dtype and memory layout of `template` (the op contract for outputs)."""
    return torch.empty_like(template).copy_(value)


def attention_forward(q, k, v, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed):
    """Returns out [B, H, L, D] (dtype of q) and lse [B, H, L] (float32; float64 for float64)."""
    compute = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse = torch.full(q.shape[:3], -math.inf, dtype=compute, device=q.device)
    for block in _blocks(seq_start, seq_len, q.shape[0], q.shape[2], max_seqlen):
        qb, kb, vb = (block.gather(t).to(compute) for t in (q, k, v))  # [N, H, L_b, D]
        probs, block_lse = _probabilities(qb, kb, block.seq_id, block.position, causal, scale)
        multiplier = _dropout_multiplier(
            block.seq_id, block.position, q.shape[1], max_seqlen, dropout_p, dropout_seed, compute
        )
        if multiplier is not None:
            probs = probs * multiplier
        block.scatter(out, probs @ vb)
        block.scatter(lse, block_lse)
    return _like(q, out), lse


def attention_backward(dout, q, k, v, out, lse, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed):
    """Gradients (dq, dk, dv); the probabilities are recomputed from q and k (the saved
    out and lse are part of the op signature for the kernels, not needed here)."""
    compute = accumulation_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(q.shape, dtype=compute, device=q.device) for _ in range(3))
    for block in _blocks(seq_start, seq_len, q.shape[0], q.shape[2], max_seqlen):
        qb, kb, vb, dob = (block.gather(t).to(compute) for t in (q, k, v, dout))  # [N, H, L_b, D]
        probs, _ = _probabilities(qb, kb, block.seq_id, block.position, causal, scale)
        multiplier = _dropout_multiplier(
            block.seq_id, block.position, q.shape[1], max_seqlen, dropout_p, dropout_seed, compute
        )
        dropped = probs if multiplier is None else probs * multiplier
        dprobs = dob @ vb.transpose(-1, -2)  # [N, H, L_b, L_b]
        if multiplier is not None:
            dprobs = dprobs * multiplier
        dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
        block.scatter(dq, (dscores @ kb) * scale)
        block.scatter(dk, (dscores.transpose(-1, -2) @ qb) * scale)
        block.scatter(dv, dropped.transpose(-1, -2) @ dob)
    return _like(q, dq), _like(k, dk), _like(v, dv)
