"""FlashAttention-style causal attention for padded and packed histories, in Triton.

Same op-level contract as `seqrec_kernels/reference/attention.py`. One program handles
one block of query rows (forward, dq) or key rows (dk/dv) of one (sequence, head); rows
are addressed relative to the sequence's first token, so padding is never loaded, tiles
above the causal diagonal are never visited, and a program whose rows are all padding
exits at once. Outputs start uninitialized: the programs of each (sequence, head) first
write the rows of its batch row that no sequence holds (out and gradients 0, LSE -inf),
so that no fill launches precede the kernels. Softmax runs in base 2 with float32 statistics;
the backward recomputes the probabilities from the saved LSE instead of storing the
L x L matrix. At a head dim that is not a multiple of 16 (SASRec's 50), where the kernels
re-read their operands, these are first copied by one launch into a buffer whose rows are
zero-padded to a multiple of 16 (as FlashAttention pads): Triton then proves 16-byte
aligned rows and a load mask constant over 16 columns, hence 128-bit loads and cp.async
pipelining, which rows of 50 elements do not get. Zero columns add 0 to every dot product.
"""

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import tuning
from .._limits import check_head_dim
from ..backends import triton_interpreted
from ..reference.dropout import keep_threshold
from ._launch import BoundLaunch, cached_plan, cdiv, next_power_of_2
from .dropout import keep_mask, row_hash

LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))
LN2: tl.constexpr = tl.constexpr(math.log(2.0))
# Every launch lets ptxas use all 255 registers a thread may have (`maxnreg`): left to
# itself it stopped short (96 in the D=16 forward, 128 in backward kernels, 80 in the
# deterministic item gradient) and spilled at 16-bit.
MAX_REGISTERS = 255
PAD_MULTIPLE = 16  # padded rows are a multiple of this many elements wide
PAD_BLOCK_ROWS = 32  # rows per program of _pad_rows_kernel


@triton.jit
def _this_program(SeqStart, SeqLen, num_heads, num_rows, max_seqlen, BLOCK: tl.constexpr):
    """This program's sequence, head, the sequence's first row and length, and the first
    row (relative to the sequence) of its block. Start and length are clamped so that
    values the caller could not check (under torch.compile or CUDA graph capture) never
    address memory outside the tensors."""
    seq = tl.program_id(0) // num_heads
    head = tl.program_id(0) % num_heads
    start = tl.minimum(tl.maximum(tl.load(SeqStart + seq), 0), num_rows)
    length = tl.minimum(tl.maximum(tl.load(SeqLen + seq), 0), tl.minimum(num_rows - start, max_seqlen))
    return seq, head, start, length, tl.program_id(1) * BLOCK


@triton.jit
def _padding_rows(seq, start, length, num_rows, seqs_per_row):
    """The rows of this sequence's batch row that no sequence holds and that its programs
    write: [0, lead_end) before the row's first sequence and [tail_start, num_rows) after
    its last (both empty for a sequence in between). A padded batch row holds one
    sequence; the packed form's one row holds all of them end to end (seqs_per_row = B)."""
    lead_end = tl.where(seq % seqs_per_row == 0, start, 0)
    tail_start = tl.where(seq % seqs_per_row == seqs_per_row - 1, start + length, num_rows)
    return lead_end, tail_start


@triton.jit
def _write_padding(Ptr, seq, head, stride_b, stride_h, stride_l, lead_end, tail_start, num_rows, value, width,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Writes `value` to columns [0, width) of the padding rows (_padding_rows) of (seq,
    head): the outputs start uninitialized. Program j of the G on grid axis 1 takes blocks
    j, j + G, ... of those rows: at most one in the padded form (L rows, G * BLOCK >= L),
    a loop over a packed tail longer than max_seqlen."""
    base = Ptr + seq.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    offs_d = tl.arange(0, BLOCK_D)
    num_padding = lead_end + (num_rows - tail_start)
    for first in range(tl.program_id(1) * BLOCK, num_padding, tl.num_programs(1) * BLOCK):
        i = first + tl.arange(0, BLOCK)
        rows = tl.where(i < lead_end, i, i - lead_end + tail_start)
        mask = (i[:, None] < num_padding) & (offs_d[None, :] < width)
        tl.store(base + rows[:, None].to(tl.int64) * stride_l + offs_d[None, :], value, mask=mask)


@triton.jit
def _row_base(Ptr, seq, head, start, stride_b, stride_h, stride_l):
    """Pointer to the first token of (seq, head); stride_b is 0 in the packed form."""
    return Ptr + seq.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l


@triton.jit
def _load_rows(base, rows, stride_l, length, offs_d, width, DOT_DTYPE: tl.constexpr):
    """A [rows, BLOCK_D] tile, zero outside the sequence and at columns >= width (the
    head dim, or the padded width of a zero-padded operand)."""
    mask = (rows[:, None] < length) & (offs_d[None, :] < width)
    return tl.load(base + rows[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _products_nt(a, a_base, a_rows, stride_a, b, b_base, b_rows, stride_b, length, width,
                 DOT_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """a [BA, BD] @ b [BB, BD]^T in float32, a and b the tiles _load_rows read at rows a_rows
    and b_rows. At DOT_CHUNK < BD (_dot_chunk) over column chunks loaded again (cache hits)."""
    BLOCK_D: tl.constexpr = a.shape[1]
    if DOT_CHUNK == BLOCK_D:
        return tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION)
    acc = tl.zeros([a.shape[0], b.shape[0]], tl.float32)
    for start in range(0, BLOCK_D, DOT_CHUNK):
        offs_c = start + tl.arange(0, DOT_CHUNK)
        a_c = _load_rows(a_base, a_rows, stride_a, length, offs_c, width, a.dtype)
        b_c = _load_rows(b_base, b_rows, stride_b, length, offs_c, width, b.dtype)
        acc = tl.dot(a_c, tl.trans(b_c), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _visible(offs_m, offs_n, length, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: query row sees key column (both real, causal order)."""
    visible = (offs_m[:, None] < length) & (offs_n[None, :] < length)
    if CAUSAL:
        visible &= offs_n[None, :] <= offs_m[:, None]
    return visible


@triton.jit
def _dropout_row_hashes(Seed, seq, head, num_heads, max_seqlen, offs_m):
    seed = tl.load(Seed).to(tl.uint32)
    row_key = (seq.to(tl.uint32) * num_heads + head) * max_seqlen + offs_m.to(tl.uint32)
    return row_hash(seed, row_key)


@triton.jit
def _pad_operand(Src, stride_b, stride_h, stride_l, dst, dst_mask, pair, rows, offs_d, num_heads, head_dim):
    """Copies one operand's tile of rows to `dst`, zeros at columns >= head_dim."""
    src = Src + (pair // num_heads).to(tl.int64) * stride_b + (pair % num_heads).to(tl.int64) * stride_h
    src += rows[:, None].to(tl.int64) * stride_l + offs_d[None, :]
    tl.store(dst, tl.load(src, mask=dst_mask & (offs_d[None, :] < head_dim), other=0.0), mask=dst_mask)


@triton.jit
def _pad_rows_kernel(
    Padded, Q, K, V, DOut,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    num_heads, num_rows, head_dim, padded_dim,
    WITH_DOUT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Padded [n, B, H, L, padded_dim] (contiguous) = Q, K, V and, WITH_DOUT, DOut [B, H, L,
    head_dim], zeros at columns >= head_dim. A program copies BLOCK rows of one (batch row,
    head) of each operand; every row is copied, padding rows too (never read)."""
    row_blocks = tl.cdiv(num_rows, BLOCK)
    pair = tl.program_id(0) // row_blocks  # b * H + h
    rows = (tl.program_id(0) % row_blocks) * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    operand_size = (tl.num_programs(0) // row_blocks).to(tl.int64) * num_rows * padded_dim  # B * H * L * padded_dim
    dst = Padded + (pair.to(tl.int64) * num_rows + rows[:, None]) * padded_dim + offs_d[None, :]
    mask = (rows[:, None] < num_rows) & (offs_d[None, :] < padded_dim)
    _pad_operand(Q, stride_qb, stride_qh, stride_ql, dst, mask, pair, rows, offs_d, num_heads, head_dim)
    _pad_operand(K, stride_kb, stride_kh, stride_kl, dst + operand_size, mask, pair, rows, offs_d, num_heads, head_dim)
    _pad_operand(V, stride_vb, stride_vh, stride_vl, dst + 2 * operand_size, mask, pair, rows, offs_d,
                 num_heads, head_dim)  # fmt: skip
    if WITH_DOUT:
        _pad_operand(DOut, stride_db, stride_dh, stride_dl, dst + 3 * operand_size, mask, pair, rows, offs_d,
                     num_heads, head_dim)  # fmt: skip


@triton.jit
def _fwd_tile(acc, row_max, row_sum, key_start, q, q_base, offs_m, k_base, V, v_base, stride_ql, stride_kl, stride_vl,
              length, offs_d, read_dim, qk_scale_log2, drop_threshold, drop_scale, hashes,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One key tile of the forward's online softmax: (acc, row_max, row_sum) updated with keys
    key_start .. key_start + BLOCK_N - 1. MASKED: the tile may hold keys a row must not see."""
    offs_n = key_start + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, stride_kl, length, offs_d, read_dim, DOT_DTYPE)  # [BN, BD]
    logits = _products_nt(q, q_base, offs_m, stride_ql, k, k_base, offs_n, stride_kl, length, read_dim, DOT_CHUNK,
                          DOT_PRECISION) * qk_scale_log2  # fmt: skip
    if MASKED:
        logits = tl.where(_visible(offs_m, offs_n, length, CAUSAL), logits, -float("inf"))
    new_max = tl.maximum(row_max, tl.max(logits, 1))
    safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)  # rows that saw no key yet
    p = tl.exp2(logits - safe_max[:, None])
    rescale = tl.exp2(row_max - safe_max)
    row_sum = row_sum * rescale + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(keep_mask(hashes, offs_n, drop_threshold), p * drop_scale, 0.0)
    v = _load_rows(v_base, offs_n, stride_vl, length, offs_d, read_dim, DOT_DTYPE)
    p = p.to(V.dtype.element_ty).to(DOT_DTYPE)
    acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, SeqStart, SeqLen, Seed,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_lb, stride_lh,
    num_heads, num_rows, max_seqlen, head_dim, seqs_per_row, read_dim,
    qk_scale_log2, drop_threshold, drop_scale,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAVY_FIRST: tl.constexpr,
    MASK_EDGES_ONLY: tl.constexpr,
):  # fmt: skip
    """Out and LSE for one block of queries, streaming the keys it sees. Q, K and V rows are
    read_dim wide: head_dim, or zero-padded to a multiple of 16 (_read_width). Tuning
    candidates: HEAVY_FIRST, grid axis 1 runs the query blocks last to first, so that under a
    causal mask the blocks with the most keys start first instead of setting the tail;
    MASK_EDGES_ONLY, the visibility mask only on the key tiles that cross the diagonal or the
    sequence's end."""
    seq, head, start, length, block_start = _this_program(SeqStart, SeqLen, num_heads, num_rows, max_seqlen, BLOCK_M)
    if HEAVY_FIRST:
        block_start = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    lead_end, tail_start = _padding_rows(seq, start, length, num_rows, seqs_per_row)
    _write_padding(Out, seq, head, stride_ob, stride_oh, stride_ol, lead_end, tail_start, num_rows, 0.0, head_dim,
                   BLOCK_M, BLOCK_D)  # fmt: skip
    _write_padding(Lse, seq, head, stride_lb, stride_lh, 1, lead_end, tail_start, num_rows, -float("inf"), 1,
                   BLOCK_M, 1)  # fmt: skip
    if block_start >= length:  # every row of this block is padding
        return

    offs_m = block_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = _row_base(Q, seq, head, start, stride_qb, stride_qh, stride_ql)
    k_base = _row_base(K, seq, head, start, stride_kb, stride_kh, stride_kl)
    v_base = _row_base(V, seq, head, start, stride_vb, stride_vh, stride_vl)
    q = _load_rows(q_base, offs_m, stride_ql, length, offs_d, read_dim, DOT_DTYPE)  # [BM, BD]
    # The dropout hashes of the block's rows (without dropout a placeholder the tiles never read).
    hashes = _dropout_row_hashes(Seed, seq, head, num_heads, max_seqlen, offs_m) if DROPOUT else offs_m

    row_max = tl.full([BLOCK_M], -float("inf"), tl.float32)  # running max of base-2 logits
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key_end = tl.minimum(length, block_start + BLOCK_M) if CAUSAL else length
    masked_start = 0
    if MASK_EDGES_ONLY:
        # Key tiles that every query row of the block sees (before the diagonal, inside the
        # sequence) need no mask; only the tiles from masked_start on cross the diagonal or the end.
        seen_by_all = tl.minimum(block_start + 1, length) if CAUSAL else length
        masked_start = (seen_by_all // BLOCK_N) * BLOCK_N
        for key_start in range(0, masked_start, BLOCK_N):
            acc, row_max, row_sum = _fwd_tile(
                acc, row_max, row_sum, key_start, q, q_base, offs_m, k_base, V, v_base, stride_ql, stride_kl,
                stride_vl, length, offs_d, read_dim, qk_scale_log2, drop_threshold, drop_scale, hashes,
                False, CAUSAL, DROPOUT, BLOCK_N, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION,
            )  # fmt: skip
    for key_start in range(masked_start, key_end, BLOCK_N):
        acc, row_max, row_sum = _fwd_tile(
            acc, row_max, row_sum, key_start, q, q_base, offs_m, k_base, V, v_base, stride_ql, stride_kl, stride_vl,
            length, offs_d, read_dim, qk_scale_log2, drop_threshold, drop_scale, hashes,
            True, CAUSAL, DROPOUT, BLOCK_N, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip

    saw_key = row_sum > 0.0
    safe_sum = tl.where(saw_key, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    o_base = _row_base(Out, seq, head, start, stride_ob, stride_oh, stride_ol)
    o_mask = (offs_m[:, None] < length) & (offs_d[None, :] < head_dim)
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
    lse = tl.where(saw_key, (row_max + tl.log2(safe_sum)) * LN2, -float("inf"))
    lse_base = _row_base(Lse, seq, head, start, stride_lb, stride_lh, 1)
    tl.store(lse_base + offs_m, lse, mask=offs_m < length)


@triton.jit
def _attention_bwd_delta_kernel(
    Out, DOut, Delta, SeqStart, SeqLen,
    stride_ob, stride_oh, stride_ol,
    stride_db, stride_dh, stride_dl,
    stride_lb, stride_lh,
    num_heads, num_rows, max_seqlen, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dOut * Out) in float32, the softmax-backward correction term."""
    seq, head, start, length, block_start = _this_program(SeqStart, SeqLen, num_heads, num_rows, max_seqlen, BLOCK_M)
    if block_start >= length:
        return
    offs_m = block_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o_base = _row_base(Out, seq, head, start, stride_ob, stride_oh, stride_ol)
    do_base = _row_base(DOut, seq, head, start, stride_db, stride_dh, stride_dl)
    o = _load_rows(o_base, offs_m, stride_ol, length, offs_d, head_dim, tl.float32)
    do = _load_rows(do_base, offs_m, stride_dl, length, offs_d, head_dim, tl.float32)
    delta_base = _row_base(Delta, seq, head, start, stride_lb, stride_lh, 1)
    tl.store(delta_base + offs_m, tl.sum(o * do, 1), mask=offs_m < length)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, SeqStart, SeqLen, Seed,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    stride_lb, stride_lh,
    num_heads, num_rows, max_seqlen, head_dim, seqs_per_row, read_dim,
    scale, qk_scale_log2, drop_threshold, drop_scale,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dK, dV for one block of keys, streaming the query blocks that can see them. Q, K, V
    and DOut rows are read_dim wide, as in _attention_fwd_kernel."""
    seq, head, start, length, block_start = _this_program(SeqStart, SeqLen, num_heads, num_rows, max_seqlen, BLOCK_N)
    lead_end, tail_start = _padding_rows(seq, start, length, num_rows, seqs_per_row)
    _write_padding(DK, seq, head, stride_dkb, stride_dkh, stride_dkl, lead_end, tail_start, num_rows, 0.0, head_dim,
                   BLOCK_N, BLOCK_D)  # fmt: skip
    _write_padding(DV, seq, head, stride_dvb, stride_dvh, stride_dvl, lead_end, tail_start, num_rows, 0.0, head_dim,
                   BLOCK_N, BLOCK_D)  # fmt: skip
    if block_start >= length:
        return

    offs_n = block_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = _row_base(Q, seq, head, start, stride_qb, stride_qh, stride_ql)
    k_base = _row_base(K, seq, head, start, stride_kb, stride_kh, stride_kl)
    v_base = _row_base(V, seq, head, start, stride_vb, stride_vh, stride_vl)
    do_base = _row_base(DOut, seq, head, start, stride_db, stride_dh, stride_dl)
    lse_base = _row_base(Lse, seq, head, start, stride_lb, stride_lh, 1)
    delta_base = _row_base(Delta, seq, head, start, stride_lb, stride_lh, 1)
    k = _load_rows(k_base, offs_n, stride_kl, length, offs_d, read_dim, DOT_DTYPE)  # [BN, BD]
    v = _load_rows(v_base, offs_n, stride_vl, length, offs_d, read_dim, DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Under causal masking, queries before this key block cannot see it.
    query_begin = (block_start // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for query_start in range(query_begin, length, BLOCK_M):
        offs_m = query_start + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, stride_ql, length, offs_d, read_dim, DOT_DTYPE)  # [BM, BD]
        do = _load_rows(do_base, offs_m, stride_dl, length, offs_d, read_dim, DOT_DTYPE)
        lse = tl.load(lse_base + offs_m, mask=offs_m < length, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=offs_m < length, other=0.0)
        logits = _products_nt(q, q_base, offs_m, stride_ql, k, k_base, offs_n, stride_kl, length, read_dim, DOT_CHUNK,
                              DOT_PRECISION) * qk_scale_log2  # fmt: skip
        visible = _visible(offs_m, offs_n, length, CAUSAL)
        p = tl.exp2(tl.where(visible, logits - lse[:, None] * LOG2E, -float("inf")))
        dp = _products_nt(do, do_base, offs_m, stride_dl, v, v_base, offs_n, stride_vl, length, read_dim, DOT_CHUNK,
                          DOT_PRECISION)  # fmt: skip
        if DROPOUT:
            hashes = _dropout_row_hashes(Seed, seq, head, num_heads, max_seqlen, offs_m)
            keep = keep_mask(hashes, offs_n, drop_threshold)
            p_dropped = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            p_dropped = p
        p_dropped = p_dropped.to(Q.dtype.element_ty).to(DOT_DTYPE)
        dv += tl.dot(tl.trans(p_dropped), do, input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty).to(DOT_DTYPE)
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)

    mask = (offs_n[:, None] < length) & (offs_d[None, :] < head_dim)
    dk_base = _row_base(DK, seq, head, start, stride_dkb, stride_dkh, stride_dkl)
    dv_base = _row_base(DV, seq, head, start, stride_dvb, stride_dvh, stride_dvl)
    tl.store(dk_base + offs_n[:, None] * stride_dkl + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, SeqStart, SeqLen, Seed,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    stride_lb, stride_lh,
    num_heads, num_rows, max_seqlen, head_dim, seqs_per_row, read_dim,
    scale, qk_scale_log2, drop_threshold, drop_scale,
    stride_dqb, stride_dqh, stride_dql,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, HEAVY_FIRST: tl.constexpr,
):  # fmt: skip
    """dQ for one block of queries, streaming the keys it sees. Operand rows are read_dim
    wide, as in _attention_bwd_dkdv_kernel. HEAVY_FIRST (a tuning candidate): the query
    blocks last to first, as in _attention_fwd_kernel."""
    seq, head, start, length, block_start = _this_program(SeqStart, SeqLen, num_heads, num_rows, max_seqlen, BLOCK_M)
    if HEAVY_FIRST:
        block_start = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    lead_end, tail_start = _padding_rows(seq, start, length, num_rows, seqs_per_row)
    _write_padding(DQ, seq, head, stride_dqb, stride_dqh, stride_dql, lead_end, tail_start, num_rows, 0.0, head_dim,
                   BLOCK_M, BLOCK_D)  # fmt: skip
    if block_start >= length:
        return

    offs_m = block_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = _row_base(Q, seq, head, start, stride_qb, stride_qh, stride_ql)
    k_base = _row_base(K, seq, head, start, stride_kb, stride_kh, stride_kl)
    v_base = _row_base(V, seq, head, start, stride_vb, stride_vh, stride_vl)
    do_base = _row_base(DOut, seq, head, start, stride_db, stride_dh, stride_dl)
    lse_base = _row_base(Lse, seq, head, start, stride_lb, stride_lh, 1)
    delta_base = _row_base(Delta, seq, head, start, stride_lb, stride_lh, 1)
    q = _load_rows(q_base, offs_m, stride_ql, length, offs_d, read_dim, DOT_DTYPE)  # [BM, BD]
    do = _load_rows(do_base, offs_m, stride_dl, length, offs_d, read_dim, DOT_DTYPE)
    lse = tl.load(lse_base + offs_m, mask=offs_m < length, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=offs_m < length, other=0.0)
    if DROPOUT:
        hashes = _dropout_row_hashes(Seed, seq, head, num_heads, max_seqlen, offs_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    key_end = tl.minimum(length, block_start + BLOCK_M) if CAUSAL else length
    for key_start in range(0, key_end, BLOCK_N):
        offs_n = key_start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_kl, length, offs_d, read_dim, DOT_DTYPE)  # [BN, BD]
        v = _load_rows(v_base, offs_n, stride_vl, length, offs_d, read_dim, DOT_DTYPE)
        logits = _products_nt(q, q_base, offs_m, stride_ql, k, k_base, offs_n, stride_kl, length, read_dim, DOT_CHUNK,
                              DOT_PRECISION) * qk_scale_log2  # fmt: skip
        visible = _visible(offs_m, offs_n, length, CAUSAL)
        p = tl.exp2(tl.where(visible, logits - lse[:, None] * LOG2E, -float("inf")))
        dp = _products_nt(do, do_base, offs_m, stride_dl, v, v_base, offs_n, stride_vl, length, read_dim, DOT_CHUNK,
                          DOT_PRECISION)  # fmt: skip
        if DROPOUT:
            dp = tl.where(keep_mask(hashes, offs_n, drop_threshold), dp * drop_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty).to(DOT_DTYPE)
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)

    dq_base = _row_base(DQ, seq, head, start, stride_dqb, stride_dqh, stride_dql)
    mask = (offs_m[:, None] < length) & (offs_d[None, :] < head_dim)
    tl.store(dq_base + offs_m[:, None] * stride_dql + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_fused_tile(dk, dv, query_start, k, k_base, v, v_base, offs_n, offs_d, q_base, do_base, lse_base, delta_base,
                    dq_base, Seed, seq, head, num_heads, max_seqlen, stride_ql, stride_kl, stride_vl, stride_dl,
                    stride_dql, length, read_dim, head_dim, scale, qk_scale_log2, drop_threshold, drop_scale,
                    ELEMENT: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                    BLOCK_M: tl.constexpr, DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One query tile of _attention_bwd_fused_kernel: (dk, dv) updated with queries query_start
    .. query_start + BLOCK_M - 1, and their dq terms added to the float32 dq buffer. MASKED:
    the tile may hold (query, key) pairs that are not visible. ELEMENT: the inputs' dtype (dS
    and P are rounded to it before their products, as in the default kernels)."""
    offs_m = query_start + tl.arange(0, BLOCK_M)
    q = _load_rows(q_base, offs_m, stride_ql, length, offs_d, read_dim, DOT_DTYPE)  # [BM, BD]
    do = _load_rows(do_base, offs_m, stride_dl, length, offs_d, read_dim, DOT_DTYPE)
    lse = tl.load(lse_base + offs_m, mask=offs_m < length, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=offs_m < length, other=0.0)
    logits = _products_nt(q, q_base, offs_m, stride_ql, k, k_base, offs_n, stride_kl, length, read_dim, DOT_CHUNK,
                          DOT_PRECISION) * qk_scale_log2  # fmt: skip
    shifted = logits - lse[:, None] * LOG2E
    if MASKED:
        shifted = tl.where(_visible(offs_m, offs_n, length, CAUSAL), shifted, -float("inf"))
    p = tl.exp2(shifted)
    dp = _products_nt(do, do_base, offs_m, stride_dl, v, v_base, offs_n, stride_vl, length, read_dim, DOT_CHUNK,
                      DOT_PRECISION)  # fmt: skip
    if DROPOUT:
        keep = keep_mask(_dropout_row_hashes(Seed, seq, head, num_heads, max_seqlen, offs_m), offs_n, drop_threshold)
        p_dropped = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        p_dropped = p
    dv += tl.dot(tl.trans(p_dropped.to(ELEMENT).to(DOT_DTYPE)), do, input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(ELEMENT).to(DOT_DTYPE)
    dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * scale  # [BM, BD]: this key block's share
    dq_mask = (offs_m[:, None] < length) & (offs_d[None, :] < head_dim)
    tl.atomic_add(dq_base + offs_m[:, None] * stride_dql + offs_d[None, :], dq, mask=dq_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _attention_bwd_fused_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, DQAcc, SeqStart, SeqLen, Seed,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dl,
    stride_lb, stride_lh,
    num_heads, num_rows, max_seqlen, head_dim, seqs_per_row, read_dim,
    scale, qk_scale_log2, drop_threshold, drop_scale,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    stride_dqb, stride_dqh, stride_dql,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, MASK_EDGES_ONLY: tl.constexpr,
):  # fmt: skip
    """The backward in one pass (a tuning candidate, ATOMIC_DQ; FlashAttention-2's): dK, dV for
    one block of keys as _attention_bwd_dkdv_kernel, and the dQ terms of its (query, key) pairs
    added with float32 atomics to DQAcc (zero-initialized, the layout of Q), so that each tile
    takes 5 products (Q K^T, dO V^T, P^T dO, dS^T Q, dS K) instead of the 7 of the two kernels.
    The order of the additions into a dQ row varies from run to run: dQ is not deterministic.
    Under a causal mask program 0 takes the key block every query block sees: the grid already
    runs heaviest first. MASK_EDGES_ONLY: the mask only on the query tiles that cross the
    diagonal or the sequence's end."""
    seq, head, start, length, block_start = _this_program(SeqStart, SeqLen, num_heads, num_rows, max_seqlen, BLOCK_N)
    lead_end, tail_start = _padding_rows(seq, start, length, num_rows, seqs_per_row)
    _write_padding(DK, seq, head, stride_dkb, stride_dkh, stride_dkl, lead_end, tail_start, num_rows, 0.0, head_dim,
                   BLOCK_N, BLOCK_D)  # fmt: skip
    _write_padding(DV, seq, head, stride_dvb, stride_dvh, stride_dvl, lead_end, tail_start, num_rows, 0.0, head_dim,
                   BLOCK_N, BLOCK_D)  # fmt: skip
    if block_start >= length:
        return

    offs_n = block_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = _row_base(Q, seq, head, start, stride_qb, stride_qh, stride_ql)
    k_base = _row_base(K, seq, head, start, stride_kb, stride_kh, stride_kl)
    v_base = _row_base(V, seq, head, start, stride_vb, stride_vh, stride_vl)
    do_base = _row_base(DOut, seq, head, start, stride_db, stride_dh, stride_dl)
    lse_base = _row_base(Lse, seq, head, start, stride_lb, stride_lh, 1)
    delta_base = _row_base(Delta, seq, head, start, stride_lb, stride_lh, 1)
    dq_base = _row_base(DQAcc, seq, head, start, stride_dqb, stride_dqh, stride_dql)
    k = _load_rows(k_base, offs_n, stride_kl, length, offs_d, read_dim, DOT_DTYPE)  # [BN, BD]
    v = _load_rows(v_base, offs_n, stride_vl, length, offs_d, read_dim, DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # Query tiles [query_begin, length) in steps of BLOCK_M (causal: none before the key
    # block's query-tile boundary sees it); MASK_EDGES_ONLY: [unmasked_start, unmasked_end)
    # see every key of the block (after the diagonal, inside the sequence) and skip the mask.
    query_begin = (block_start // BLOCK_M) * BLOCK_M if CAUSAL else 0
    unmasked_start = length
    unmasked_end = length
    if MASK_EDGES_ONLY:
        if block_start + BLOCK_N <= length:  # else the block holds keys past the end: every tile masked
            last_key = block_start + BLOCK_N - 1
            first_seeing_all = last_key if CAUSAL else 0  # the first query that sees every key of the block
            unmasked_start = query_begin + tl.cdiv(tl.maximum(first_seeing_all - query_begin, 0), BLOCK_M) * BLOCK_M
            unmasked_start = tl.minimum(unmasked_start, length)
            unmasked_end = tl.maximum(unmasked_start, query_begin + (length - query_begin) // BLOCK_M * BLOCK_M)
    for query_start in range(query_begin, unmasked_start, BLOCK_M):
        dk, dv = _bwd_fused_tile(
            dk, dv, query_start, k, k_base, v, v_base, offs_n, offs_d, q_base, do_base, lse_base, delta_base, dq_base,
            Seed, seq, head, num_heads, max_seqlen, stride_ql, stride_kl, stride_vl, stride_dl, stride_dql, length,
            read_dim, head_dim, scale, qk_scale_log2, drop_threshold, drop_scale,
            Q.dtype.element_ty, True, CAUSAL, DROPOUT, BLOCK_M, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    for query_start in range(unmasked_start, unmasked_end, BLOCK_M):
        dk, dv = _bwd_fused_tile(
            dk, dv, query_start, k, k_base, v, v_base, offs_n, offs_d, q_base, do_base, lse_base, delta_base, dq_base,
            Seed, seq, head, num_heads, max_seqlen, stride_ql, stride_kl, stride_vl, stride_dl, stride_dql, length,
            read_dim, head_dim, scale, qk_scale_log2, drop_threshold, drop_scale,
            Q.dtype.element_ty, False, CAUSAL, DROPOUT, BLOCK_M, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    for query_start in range(unmasked_end, length, BLOCK_M):
        dk, dv = _bwd_fused_tile(
            dk, dv, query_start, k, k_base, v, v_base, offs_n, offs_d, q_base, do_base, lse_base, delta_base, dq_base,
            Seed, seq, head, num_heads, max_seqlen, stride_ql, stride_kl, stride_vl, stride_dl, stride_dql, length,
            read_dim, head_dim, scale, qk_scale_log2, drop_threshold, drop_scale,
            Q.dtype.element_ty, True, CAUSAL, DROPOUT, BLOCK_M, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip

    mask = (offs_n[:, None] < length) & (offs_d[None, :] < head_dim)
    dk_base = _row_base(DK, seq, head, start, stride_dkb, stride_dkh, stride_dkl)
    dv_base = _row_base(DV, seq, head, start, stride_dvb, stride_dvh, stride_dvl)
    tl.store(dk_base + offs_n[:, None] * stride_dkl + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_base + offs_n[:, None] * stride_dvl + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------- launchers


def _launch_config(head_dim, dtype, backward, max_seqlen, device):
    """Block sizes and launch options: (BLOCK_M, BLOCK_N, BLOCK_D, {num_warps, num_stages, maxnreg, ...}),
    today's defaults below unless the GPU's tuning table (seqrec_kernels.tuning) measured a faster
    configuration for this kernel, dtype, head dim and length class."""
    block_d = max(16, next_power_of_2(head_dim))
    default = _default_launch_config(block_d, dtype, backward)
    key = tuning.attention_key(dtype, block_d, max_seqlen)
    config = tuning.launch_config("attention_bwd" if backward else "attention_fwd", key, device, default)
    launch = {name: value for name, value in config.items() if name not in ("BLOCK_M", "BLOCK_N")}
    return config["BLOCK_M"], config["BLOCK_N"], block_d, dict(launch, maxnreg=MAX_REGISTERS)


def _default_launch_config(block_d, dtype, backward):
    """Today's configuration: {BLOCK_M, BLOCK_N, num_warps, num_stages} and the schedules,
    off: HEAVY_FIRST and MASK_EDGES_ONLY; the backward's ATOMIC_DQ (one pass, dq by atomics:
    _attention_bwd_fused_kernel, where MASK_EDGES_ONLY applies; HEAVY_FIRST applies to the
    two-pass backward's dq kernel). A tuning table may replace every key."""
    config = dict(_default_blocks_and_warps(block_d, dtype, backward), HEAVY_FIRST=False, MASK_EDGES_ONLY=False)
    return dict(config, ATOMIC_DQ=False) if backward else config


def _default_blocks_and_warps(block_d, dtype, backward):
    if triton_interpreted():  # small blocks: cheaper to interpret, more edges exercised
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    # float32 operand tiles take twice the registers: the narrow tiles at any D (64-row tiles
    # spilled kilobytes at D=50 in every float32 precision mode).
    wide = block_d > 128 or dtype == torch.float32
    # Two stages (cp.async) on 16-bit wide tiles as well: D=256 fits them without spills.
    wide_stages = 1 if dtype == torch.float32 else 2
    if backward:
        block_m, block_n, num_warps, num_stages = (
            (16, 32, 8, wide_stages) if wide else (32, 64, 4 if block_d <= 64 else 8, 2)
        )
        if dtype == torch.float32 and block_d > 128:
            # dk/dv accumulators of 16 key rows: 32 spilled 40 B (sm_80, D=256, 3xTF32, dropout).
            block_n = 16
        # 8 warps at D=128: else dk/dv spilled at 16-bit (D=128 with dropout).
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    block_m, block_n, num_stages = (32, 32, wide_stages) if wide else (64, 64 if block_d <= 64 else 32, 2)
    num_warps = 8 if dtype == torch.float32 else 4  # 4 spilled at float32 (IEEE, D=50, no causal mask)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


# float32 tile products by torch.get_float32_matmul_precision() (torch.backends.cuda.matmul.
# allow_tf32 sets it too): "highest" IEEE float32 on CUDA cores; "high" 3xTF32 on tensor
# cores (float32 accuracy; each operand split into a TF32 value and its remainder); "medium"
# bfloat16 operands. Products accumulate in float32 in every mode.
FLOAT32_DOT = {"highest": (tl.float32, "ieee"), "high": (tl.float32, "tf32x3"), "medium": (tl.bfloat16, "tf32")}


def _dot_options(dtype, head_dim: int) -> dict:
    """DOT_DTYPE (what tl.dot multiplies) and DOT_PRECISION (its float32 input precision)
    for inputs of `dtype` and a head (hidden) dim of `head_dim`. 3xTF32 only up to D=512:
    beyond, the backward's products with whole [BN, D] operand tiles, split in two, spilled
    40-150 B per thread (D=1024, sm_90); IEEE there.
    Under the interpreter: float32 products, since it multiplies bfloat16 bit patterns
    (triton-lang/triton#11584) and ignores input_precision; for 16-bit inputs float32 gives
    the same products (a 16-bit product is exact in float32)."""
    wide = bool(head_dim > 512)  # a plain bool also where head_dim is traced (symbolic)
    return dict(_dot_options_in(dtype, wide, triton_interpreted(), torch.get_float32_matmul_precision()))


@functools.lru_cache(maxsize=64)  # per call of the loss and retrieval launchers: computed once per mode
def _dot_options_in(dtype, wide: bool, interpreted: bool, float32_precision: str) -> dict:
    if interpreted:
        return dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    if dtype == torch.float32:
        dot_dtype, precision = FLOAT32_DOT[float32_precision]
        if precision == "tf32x3" and wide:
            precision = "ieee"
        return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
    return dict(DOT_DTYPE={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], DOT_PRECISION="tf32")


def _dot_chunk(dtype, block_d):
    """DOT_CHUNK: the columns per step of the tile products over the head (hidden) dim
    (_products_nt here, _scores in the losses). float32 rows go in chunks of 32 columns
    loaded again from cache when wider than 64 (IEEE or 3xTF32 products) or 128 (bfloat16
    products, "medium"): products of whole rows spilled 8 B to 3 KB per thread there. Under
    the interpreter float32 chunks from D=32 on, so that the CPU tests run both paths."""
    if dtype != torch.float32:
        return block_d
    if triton_interpreted():
        return min(block_d, 16)
    widest = 64 if _dot_options(dtype, block_d)["DOT_DTYPE"] == tl.float32 else 128
    return block_d if block_d <= widest else 32


def _row_blocks(max_seqlen, block):
    """Programs per (sequence, head) on grid axis 1: one at least, so that the padding rows
    are written even where no sequence has a row (max_seqlen = 0)."""
    return cdiv(max(max_seqlen, 1), block)


def _read_width(head_dim, max_seqlen, block_m, block_n):
    """The width of the operand rows the kernels read: head_dim, or head_dim rounded up to a
    multiple of 16 where the launcher pads the operands (_pad_rows)."""
    # Padding costs a launch and a copy: it pays only where the kernels re-read the operands,
    # i.e. where a sequence spans more than one tile of the launcher's largest block (then the
    # forward's query blocks re-read k, v; the backward's key blocks q, dout, its query blocks
    # k, v). The forward pads q in the same launch: read once, unpadded it would be its only
    # unvectorized load. One tile (SASRec's L=50 at 16-bit) keeps the unpadded operands.
    if head_dim % PAD_MULTIPLE == 0 or max_seqlen <= max(block_m, block_n):
        return head_dim
    return cdiv(head_dim, PAD_MULTIPLE) * PAD_MULTIPLE


def _pad_plan(padded_dim, block_d, q, k, v, dout=None):
    """The launch that copies q, k, v (and dout), each [B, H, L, D], into one buffer
    [n, B, H, L, padded_dim], zeros at columns >= D, and that buffer's shape: _pad_rows's
    arguments."""
    batch, num_heads, num_rows, head_dim = q.shape
    dout_strides = (0, 0, 0) if dout is None else dout.stride()[:3]
    grid = (batch * num_heads * cdiv(num_rows, PAD_BLOCK_ROWS),)
    scalars = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout_strides, num_heads, num_rows, head_dim,
               padded_dim)  # fmt: skip
    meta = dict(WITH_DOUT=dout is not None, BLOCK=PAD_BLOCK_ROWS, BLOCK_D=block_d, num_warps=4, maxnreg=MAX_REGISTERS)
    shape = (3 if dout is None else 4, batch, num_heads, num_rows, padded_dim)
    return BoundLaunch(_pad_rows_kernel, grid, scalars, meta), shape


def _padded_strides(q, padded_dim, packed):
    """_strides of a slice of _pad_rows's buffer (rows padded_dim wide) for operands like q."""
    num_heads, num_rows = q.shape[1], q.shape[2]
    return (0 if packed else num_heads * num_rows * padded_dim), num_rows * padded_dim, padded_dim


def _pad_rows(launch, shape, q, k, v, dout=None):
    """q, k, v (and dout) copied by `launch` (from _pad_plan) into one buffer of `shape`
    [n, B, H, L, padded_dim], zeros at columns >= D; returns its n slices."""
    padded = torch.empty(shape, dtype=q.dtype, device=q.device)
    launch(padded, q, k, v, dout)
    return [padded[i] for i in range(shape[0])]


def _seqs_per_row(num_seqs, packed):
    """Sequences per batch row of the [B, H, L, D] view: all of them when packed, else one."""
    return num_seqs if packed else 1


def _strides(t, packed):
    """(batch, head, row) strides of a [B, H, L, ...] tensor; batch stride 0 when packed."""
    return (0 if packed else t.stride(0)), t.stride(1), t.stride(2)


def _common_args(q, num_seqs, max_seqlen, causal, scale, dropout_p):
    num_heads, num_rows, head_dim = q.shape[1], q.shape[2], q.shape[3]
    return dict(
        sizes=(num_heads, num_rows, max_seqlen, head_dim),
        meta=dict(
            CAUSAL=causal,
            DROPOUT=dropout_p > 0.0,
            DOT_CHUNK=_dot_chunk(q.dtype, max(16, next_power_of_2(head_dim))),  # BLOCK_D's chunks
            **_dot_options(q.dtype, head_dim),
        ),
        drop=(keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        packed=q.shape[0] != num_seqs,
    )


# Launch plans (tuning.derived_cache: forgotten when a table or `forcing` changes), keyed by
# _plan_key and, for the backward, the layouts of its other tensors and deterministic mode.
_forward_plans = tuning.derived_cache()
_backward_plans = tuning.derived_cache()


def _plan_key(q, k, v, num_seqs, max_seqlen, causal, scale, dropout_p):
    """What a launch plan derives from: the operands' sizes, layouts, dtype and device, the
    options, and the modes the configurations read (the interpreter's, float32 precision)."""
    return (
        q.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, num_seqs, max_seqlen, causal, scale,
        dropout_p, triton_interpreted(), torch.get_float32_matmul_precision(),
    )  # fmt: skip


def _forward_plan(q, k, v, out, lse, num_seqs, max_seqlen, causal, scale, dropout_p):
    """(_pad_rows's launch and shape or None, the forward kernel's launch) for such inputs."""
    c = _common_args(q, num_seqs, max_seqlen, causal, scale, dropout_p)
    packed = c["packed"]
    block_m, block_n, block_d, launch = _launch_config(q.shape[3], q.dtype, False, max_seqlen, q.device)
    read_dim = _read_width(q.shape[3], max_seqlen, block_m, block_n)
    pad, operand_strides = None, (*_strides(q, packed), *_strides(k, packed), *_strides(v, packed))
    if read_dim != q.shape[3]:
        pad, operand_strides = _pad_plan(read_dim, block_d, q, k, v), _padded_strides(q, read_dim, packed) * 3
    scalars = (
        *operand_strides, *_strides(out, packed), *_strides(lse, packed)[:2],
        *c["sizes"], _seqs_per_row(num_seqs, packed), read_dim, scale * math.log2(math.e), *c["drop"],
    )  # fmt: skip
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **launch, **c["meta"])
    grid = (num_seqs * q.shape[1], _row_blocks(max_seqlen, block_m))
    return pad, BoundLaunch(_attention_fwd_kernel, grid, scalars, meta)


class _BackwardPlan(NamedTuple):
    delta: BoundLaunch
    pad: tuple | None  # _pad_rows's launch and shape
    atomic_dq: bool  # one pass, dq summed in float32 by atomics: kernels = (fused,); else (dk/dv, dq)
    kernels: tuple


def _backward_plan(q, k, v, dout, out, lse, dq, dk, dv, num_seqs, max_seqlen, causal, scale, dropout_p, deterministic):
    c = _common_args(q, num_seqs, max_seqlen, causal, scale, dropout_p)
    packed, num_pairs = c["packed"], num_seqs * q.shape[1]
    lse_strides = _strides(lse, packed)[:2]  # delta's too: it is laid out like lse
    block_m, block_n, block_d, launch = _launch_config(q.shape[3], q.dtype, True, max_seqlen, q.device)
    # The schedules: the one-pass backward's dq is summed by atomics in no fixed order, so
    # deterministic mode keeps the two-pass backward.
    atomic_dq = launch.pop("ATOMIC_DQ") and not deterministic
    heavy_first, mask_edges_only = launch.pop("HEAVY_FIRST"), launch.pop("MASK_EDGES_ONLY")
    delta = BoundLaunch(_attention_bwd_delta_kernel, (num_pairs, _row_blocks(max_seqlen, block_m)),
        (*_strides(out, packed), *_strides(dout, packed), *lse_strides, *c["sizes"]),
        dict(BLOCK_M=block_m, BLOCK_D=block_d),
    )  # fmt: skip
    read_dim = _read_width(q.shape[3], max_seqlen, block_m, block_n)
    operand_strides = tuple(stride for t in (q, k, v, dout) for stride in _strides(t, packed))
    pad = None
    if read_dim != q.shape[3]:  # the delta kernel reads out and dout once: unpadded
        pad, operand_strides = _pad_plan(read_dim, block_d, q, k, v, dout), _padded_strides(q, read_dim, packed) * 4
    shared = (
        *operand_strides, *lse_strides, *c["sizes"], _seqs_per_row(num_seqs, packed), read_dim, scale,
        scale * math.log2(math.e), *c["drop"],
    )  # fmt: skip
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **launch, **c["meta"])
    key_blocks = (num_pairs, _row_blocks(max_seqlen, block_n))
    if atomic_dq:  # dq: float32 sums laid out like dq
        kernels = (BoundLaunch(_attention_bwd_fused_kernel, key_blocks,
            (*shared, *_strides(dk, packed), *_strides(dv, packed), *_strides(dq, packed)),
            dict(meta, MASK_EDGES_ONLY=mask_edges_only),
        ),)  # fmt: skip
    else:
        kernels = (
            BoundLaunch(_attention_bwd_dkdv_kernel, key_blocks, (*shared, *_strides(dk, packed), *_strides(dv, packed)),
                        meta),
            BoundLaunch(_attention_bwd_dq_kernel, (num_pairs, _row_blocks(max_seqlen, block_m)),
                        (*shared, *_strides(dq, packed)), dict(meta, HEAVY_FIRST=heavy_first)),
        )  # fmt: skip
    return _BackwardPlan(delta, pad, atomic_dq, kernels)


def attention_forward(q, k, v, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed):
    """Returns out (zeros at padding rows; the layout of q) and lse [B, H, L] float32
    (-inf at padding rows), every element written by the kernel."""
    check_head_dim(q.shape[3])
    out = torch.empty_like(q)
    lse = torch.empty(*q.shape[:3], dtype=torch.float32, device=q.device)  # sizes as arguments: half the cost
    if q.numel() == 0:
        return out, lse
    options = (seq_len.shape[0], max_seqlen, causal, scale, dropout_p)
    pad, kernel = cached_plan(_forward_plans, _plan_key(q, k, v, *options), _forward_plan, q, k, v, out, lse, *options)
    if pad is not None:
        q, k, v = _pad_rows(*pad, q, k, v)
    kernel(q, k, v, out, lse, seq_start, seq_len, dropout_seed)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, dropout_seed):
    """Gradients (dq, dk, dv), each zero at padding rows (written by the kernels) and laid
    out like its input."""
    check_head_dim(q.shape[3])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    options = (seq_len.shape[0], max_seqlen, causal, scale, dropout_p)
    deterministic = torch.are_deterministic_algorithms_enabled()
    key = (*_plan_key(q, k, v, *options), dout.stride(), out.stride(), lse.stride(), deterministic)
    plan = cached_plan(
        _backward_plans, key, _backward_plan, q, k, v, dout, out, lse, dq, dk, dv, *options, deterministic
    )
    delta = torch.empty_like(lse)  # [B, H, L]: rowsum(dout * out), read at rows of sequences only
    plan.delta(out, dout, delta, seq_start, seq_len)
    if plan.pad is not None:  # the delta kernel read out and dout once: unpadded
        q, k, v, dout = _pad_rows(*plan.pad, q, k, v, dout)
    if plan.atomic_dq:  # dq: float32 sums in dq's layout (zeros at padding rows), cast once at the end
        dq = torch.zeros_like(dq, dtype=torch.float32)
        plan.kernels[0](q, k, v, dout, lse, delta, dk, dv, dq, seq_start, seq_len, dropout_seed)
        return dq.to(q.dtype), dk, dv
    dkdv, dq_kernel = plan.kernels
    dkdv(q, k, v, dout, lse, delta, dk, dv, seq_start, seq_len, dropout_seed)
    dq_kernel(q, k, v, dout, lse, delta, dq, seq_start, seq_len, dropout_seed)
    return dq, dk, dv
