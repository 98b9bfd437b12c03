"""Retrieval over the whole catalog in Triton: top-k items and target ranks, never [B, N].

Same op-level contract as `seqrec_kernels/reference/retrieval.py`. A program scores a block
of rows against one split of the catalog, streaming item tiles through a tile product
(float32 accumulation); the grid is (row blocks, splits), enough programs to fill the GPU.

Top-k: a score and its item become one int64 key, [order-preserving bits of the float32
score | 2^31 - 1 - id], so keys order exactly as (score, then lower id): no two items tie
and no payload travels with a sort. Each (row, split) keeps its best K keys (k padded to a
power of two, at least a tile) and a buffer of K candidate keys, in global memory. A tile
is usually rejected whole by one comparison with each row's k-th best score; otherwise its
keys above the row's k-th best key that are not excluded are appended to the buffer, and a
full buffer is merged into the best K by two bitonic sorts. A torch.topk over the splits'
keys [B, splits * K] gives the answer. Extra memory: 2 * B * splits * K keys, never O(B * N).

Ranks: a program counts the items of its split that score above each row's target, then
takes back the row's excluded items it counted; the splits' counts are added atomically
(integers: exact in any order). Item tiles are as wide as the row block, so the target's and
the excluded items' scores (diagonals of [BB, BB] products) are the very values the tiles
compare.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from .._limits import check_kernel_hidden_dim, check_kernel_k
from ..backends import triton_interpreted
from ._launch import cdiv, launch_kernel, next_power_of_2
from .attention import MAX_REGISTERS, _dot_options

KEY_NONE = -(2**63)  # an empty slot: below every item's key; decodes to score -inf, id -1
_KEY_NONE = tl.constexpr(KEY_NONE)
# Keys per (row, split) scratch buffer, B * splits * K, kept under this by using fewer splits.
_SCRATCH_KEYS = 1 << 24


@triton.jit
def _item_scores(h, H, rows, row_mask, stride_h, W, items, valid, stride_w, hidden_dim,
                 BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Scores [BB, BI] of the row block against the items `items` [BI] (0 where not valid).
    h [BB, BD] is the row block in registers; wide rows (D_CHUNK < BLOCK_D) leave h unused
    and are re-read from cache D_CHUNK columns at a time, so that no [BB, BD] tile stays live."""
    if D_CHUNK == BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        w = tl.load(W + items[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                    mask=valid[:, None] & (offs_d[None, :] < hidden_dim), other=0.0)  # fmt: skip
        scores = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    else:
        scores = tl.zeros([rows.shape[0], items.shape[0]], tl.float32)
        for d_start in range(0, hidden_dim, D_CHUNK):
            offs_d = d_start + tl.arange(0, D_CHUNK)
            h_chunk = _load_rows(H, rows, row_mask, offs_d, stride_h, hidden_dim)
            w = tl.load(W + items[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                        mask=valid[:, None] & (offs_d[None, :] < hidden_dim), other=0.0)  # fmt: skip
            scores = tl.dot(h_chunk.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), scores, input_precision=DOT_PRECISION)
    return scores


@triton.jit
def _diagonal(x, BLOCK: tl.constexpr):
    """[BB] the diagonal of a [BB, BB] tile."""
    i = tl.arange(0, BLOCK)
    return tl.sum(tl.where(i[:, None] == i[None, :], x, 0.0), 1)


@triton.jit
def _load_rows(H, rows, row_mask, offs_d, stride_h, hidden_dim):
    return tl.load(H + rows[:, None].to(tl.int64) * stride_h + offs_d[None, :],
                   mask=row_mask[:, None] & (offs_d[None, :] < hidden_dim), other=0.0)  # fmt: skip


@triton.jit
def _keys(scores, ids):
    """int64 keys of scores [BB, BN] of items ids [1, BN]: larger key = higher score, then lower id."""
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 and 0.0 are one score, so one key order
    bits = scores.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _key_scores(keys):
    """The float32 scores of int64 keys (-inf for empty slots)."""
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return tl.where(keys == _KEY_NONE, -float("inf"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _pair_sort(h, flip, i: tl.constexpr, N_DIMS: tl.constexpr):
    """Orders each pair of hypercube h along its i-th innermost axis: ascending where flip is
    0, descending where it is 1."""
    axis: tl.constexpr = N_DIMS - 1 - i
    right = tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * i)
    return tl.where((right ^ flip) != 0, tl.max(h, axis, keep_dims=True), tl.min(h, axis, keep_dims=True))


@triton.jit
def _bitonic_stage(h, stage: tl.constexpr, order: tl.constexpr, N_DIMS: tl.constexpr):
    """Stage `stage` of a bitonic sort of hypercube h: order 0 ascending, 1 descending, 2
    alternating runs of 2^stage. Triton's tl.sort, with pair minima and maxima in place of
    its xor reduction, which the interpreter runs element by element (hundreds of times slower)."""
    if order == 2:
        flip = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - stage - 1) + [2] + [1] * stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _pair_sort(h, flip, stage - 1 - i, N_DIMS)
    return h


@triton.jit
def _merge(Top, Cand, first_row, num_rows, split, num_splits, k,
           BLOCK_B: tl.constexpr, LOG_K: tl.constexpr, LOG_SUB: tl.constexpr):  # fmt: skip
    """Merges every row's candidate buffer into its best 2^LOG_K keys (sorted descending),
    empties the buffers and returns each row's k-th best key and its score [BB]. The buffers
    were written, and the best keys are read back, by other threads of the program: barriers."""
    K_PAD: tl.constexpr = 2**LOG_K
    SUB: tl.constexpr = 2**LOG_SUB
    N_DIMS: tl.constexpr = LOG_SUB + LOG_K
    tl.debug_barrier()
    offs_k = tl.arange(0, K_PAD)
    for sub in range(0, BLOCK_B, SUB):  # SUB rows at a time: [SUB, K_PAD] keys stay in registers
        rows = first_row + sub + tl.arange(0, SUB)
        slots = (rows[:, None].to(tl.int64) * num_splits + split) * K_PAD + offs_k[None, :]
        mask = rows[:, None] < num_rows
        best = tl.reshape(tl.load(Top + slots, mask=mask, other=_KEY_NONE), [2] * N_DIMS)  # descending
        candidates = tl.reshape(tl.load(Cand + slots, mask=mask, other=_KEY_NONE), [2] * N_DIMS)
        for stage in tl.static_range(1, LOG_K + 1):  # sort each row's candidates ascending
            candidates = _bitonic_stage(candidates, stage, 2 if stage < LOG_K else 0, N_DIMS)
        # Descending against ascending: the elementwise maximum holds the K_PAD largest of both,
        # as a bitonic sequence, which one last stage sorts.
        best = _bitonic_stage(tl.maximum(best, candidates), LOG_K, 1, N_DIMS)
        tl.store(Top + slots, tl.reshape(best, [SUB, K_PAD]), mask=mask)
        tl.store(Cand + slots, tl.full([SUB, K_PAD], _KEY_NONE, tl.int64), mask=mask)
    tl.debug_barrier()
    rows = first_row + tl.arange(0, BLOCK_B)
    kth = tl.load(Top + (rows.to(tl.int64) * num_splits + split) * K_PAD + k - 1, mask=rows < num_rows,
                  other=_KEY_NONE)  # fmt: skip
    return kth, _key_scores(kth)


@triton.jit
def _topk_kernel(
    H, W, Exclude, Excluded, Top, Cand,
    stride_h, stride_w, stride_ex,
    num_rows, num_items, hidden_dim, num_exclude, num_excluded, k, items_per_split, num_splits,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, LOG_K: tl.constexpr,
    LOG_SUB: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Best 2^LOG_K keys of BLOCK_B rows over one split of the items (tiles of BLOCK_B items)."""
    K_PAD: tl.constexpr = 2**LOG_K
    first_row = tl.program_id(0) * BLOCK_B
    split = tl.program_id(1)
    rows = first_row + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    start = split * items_per_split
    end = tl.minimum(start + items_per_split, num_items)
    h = _load_rows(H, rows, row_mask, tl.arange(0, BLOCK_D), stride_h, hidden_dim) if D_CHUNK == BLOCK_D else 0
    buffers = Cand + (rows[:, None].to(tl.int64) * num_splits + split) * K_PAD  # [BB, 1]
    kth = tl.full([BLOCK_B], _KEY_NONE, tl.int64)  # each row's k-th best key so far
    kth_score = tl.full([BLOCK_B], -float("inf"), tl.float32)
    count = tl.zeros([BLOCK_B], tl.int32)  # keys in each row's buffer
    # One step past the end merges what the buffers hold: a single call site of _merge (its
    # sorting network is most of the kernel's code).
    for n_start in range(start, end + BLOCK_B, BLOCK_B):
        offs_n = n_start + tl.arange(0, BLOCK_B)
        item_mask = offs_n < end
        scores = _item_scores(h, H, rows, row_mask, stride_h, W, offs_n, item_mask, stride_w, hidden_dim,
                              BLOCK_D, D_CHUNK, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
        # Once the best k settle, most tiles hold no score reaching any row's k-th: one test
        # rejects them. (A float reduction: LLVM turned the boolean one into an i1-vector cast
        # that NVPTX puts on the stack.)
        margin = tl.where(row_mask[:, None], scores - kth_score[:, None], -float("inf"))
        past_end = n_start >= end
        if (tl.max(tl.max(margin, 1), 0) >= 0) | past_end:
            keys = _keys(scores, offs_n[None, :])
            for e in range(num_excluded):
                item_mask &= offs_n != tl.load(Excluded + e)
            new = (keys > kth[:, None]) & item_mask[None, :] & row_mask[:, None]
            for m in range(num_exclude):
                item = tl.load(Exclude + rows.to(tl.int64) * stride_ex + m, mask=row_mask, other=0)
                new &= (offs_n[None, :] != item[:, None]) | (item[:, None] == 0)  # 0 is padding
            added = tl.sum(new.to(tl.int32), 1)
            # A buffer would overflow: merge, then keep only keys above the new k-th.
            if (tl.max(count + added, 0) > K_PAD) | past_end:
                kth, kth_score = _merge(Top, Cand, first_row, num_rows, split, num_splits, k, BLOCK_B, LOG_K, LOG_SUB)
                count = tl.zeros([BLOCK_B], tl.int32)
                new &= keys > kth[:, None]
                added = tl.sum(new.to(tl.int32), 1)
            slot = count[:, None] + tl.cumsum(new.to(tl.int32), 1) - 1
            tl.store(buffers + slot, keys, mask=new)
            count += added


@triton.jit
def _ranks_kernel(
    H, W, Targets, Exclude, Excluded, Ranks,
    stride_h, stride_w, stride_ex,
    num_rows, num_items, hidden_dim, num_exclude, num_excluded, items_per_split,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Adds to Ranks the candidates of one split scoring above each of BLOCK_B rows' target."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < num_rows
    start = tl.program_id(1) * items_per_split
    end = tl.minimum(start + items_per_split, num_items)
    h = _load_rows(H, rows, row_mask, tl.arange(0, BLOCK_D), stride_h, hidden_dim) if D_CHUNK == BLOCK_D else 0
    target = tl.load(Targets + rows, mask=row_mask, other=-1)
    in_catalog = (target >= 0) & (target < num_items)  # else (unchecked input) the target scores 0
    target_score = _diagonal(_item_scores(h, H, rows, row_mask, stride_h, W, target, in_catalog, stride_w, hidden_dim,
                                          BLOCK_D, D_CHUNK, DOT_DTYPE, DOT_PRECISION), BLOCK_B)  # fmt: skip
    count = tl.zeros([BLOCK_B], tl.int32)
    for n_start in range(start, end, BLOCK_B):
        offs_n = n_start + tl.arange(0, BLOCK_B)
        item_mask = offs_n < end
        scores = _item_scores(h, H, rows, row_mask, stride_h, W, offs_n, item_mask, stride_w, hidden_dim,
                              BLOCK_D, D_CHUNK, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
        for e in range(num_excluded):
            item_mask &= offs_n != tl.load(Excluded + e)
        above = (scores > target_score[:, None]) & item_mask[None, :] & (offs_n[None, :] != target[:, None])
        count += tl.sum(above.to(tl.int32), 1)
    # The launcher leaves each excluded item once per row and none of Excluded: take back those counted.
    for m in range(num_exclude):
        item = tl.load(Exclude + rows.to(tl.int64) * stride_ex + m, mask=row_mask, other=0)
        counted = row_mask & (item != 0) & (item >= start) & (item < end) & (item != target)
        item_score = _diagonal(_item_scores(h, H, rows, row_mask, stride_h, W, item, counted, stride_w, hidden_dim,
                                            BLOCK_D, D_CHUNK, DOT_DTYPE, DOT_PRECISION), BLOCK_B)  # fmt: skip
        count -= (counted & (item_score > target_score)).to(tl.int32)
    tl.atomic_add(Ranks + rows, count, mask=row_mask, sem="relaxed")


def _launch(hidden):
    """(BLOCK_B, BLOCK_D, D_CHUNK, launch options): row blocks and item tiles of BLOCK_B; rows
    wider than 256 (64 in float32; 32 under the interpreter, so that tests take both paths)
    are multiplied D_CHUNK columns at a time."""
    block_d = max(16, next_power_of_2(hidden.shape[1]))
    if triton_interpreted():
        return 16, block_d, min(block_d, 32), dict(num_warps=4, num_stages=1, maxnreg=MAX_REGISTERS)
    # float32 operand tiles take twice the registers, 3xTF32 three times: 32 rows spilled.
    block = 16 if hidden.dtype == torch.float32 else 64 if block_d <= 128 else 32
    widest = 64 if hidden.dtype == torch.float32 else 256  # float32 spilled at D=128 (ranks), KBs at 256
    d_chunk = block_d if block_d <= widest else widest // 2
    # Chunked rows in one stage: software-pipelining the chunk loop spilled at D=1024 on sm_90.
    num_stages = 2 if d_chunk == block_d else 1
    return block, block_d, d_chunk, dict(num_warps=8, num_stages=num_stages, maxnreg=MAX_REGISTERS)


def _merge_rows(block, k_pad):
    """Rows a merge sorts at once: [rows, k_pad] keys of at most 2,048 in registers; the whole
    block under the interpreter, where each step costs the same whatever its size."""
    return block if triton_interpreted() else max(1, min(block, 2048 // k_pad))


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM; a few elsewhere (the interpreter, where tests
    then merge several splits)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _splits(rows, num_items, block, keys_per_row, device):
    """(items per split, splits): whole tiles per split, enough programs for the device,
    scratch keys (keys_per_row per row and split; 0: none) under _SCRATCH_KEYS, at most
    65,535 splits (grid y)."""
    row_blocks, tiles = cdiv(rows, block), cdiv(num_items, block)
    wanted = cdiv(_target_programs(device), row_blocks)
    splits = max(1, min(wanted, tiles, _SCRATCH_KEYS // max(rows * keys_per_row, 1), 65_535))
    tiles_per_split = cdiv(tiles, splits)
    return tiles_per_split * block, cdiv(tiles, tiles_per_split)


def _decode(keys):
    """(scores float32, ids int64) of int64 keys; empty slots give (-inf, -1)."""
    empty = keys == KEY_NONE
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    scores = bits.view(torch.float32).masked_fill(empty, -math.inf)
    return scores, (0x7FFFFFFF - (keys & 0xFFFFFFFF)).masked_fill(empty, -1)


def topk_forward(hidden, weight, exclude, excluded_ids, k):
    check_kernel_hidden_dim("triton", hidden.shape[1])
    check_kernel_k("triton", k)
    hidden, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, weight))
    exclude = exclude.contiguous()
    rows, num_items = hidden.shape[0], weight.shape[0]
    if rows == 0:
        return torch.empty(0, k, device=hidden.device), torch.empty(0, k, dtype=torch.int64, device=hidden.device)
    block, block_d, d_chunk, launch = _launch(hidden)
    k_pad = max(next_power_of_2(k), block)  # a whole tile fits an emptied buffer
    items_per_split, splits = _splits(rows, num_items, block, 2 * k_pad, hidden.device)
    best = torch.full((rows, splits, k_pad), KEY_NONE, dtype=torch.int64, device=hidden.device)
    candidates = torch.full_like(best, KEY_NONE)
    launch_kernel(_topk_kernel, (cdiv(rows, block), splits),
        hidden, weight, exclude, excluded_ids, best, candidates,
        hidden.stride(0), weight.stride(0), exclude.stride(0),
        rows, num_items, hidden.shape[1], exclude.shape[1], excluded_ids.numel(), k, items_per_split, splits,
        BLOCK_B=block, BLOCK_D=block_d, D_CHUNK=d_chunk, LOG_K=k_pad.bit_length() - 1,
        LOG_SUB=_merge_rows(block, k_pad).bit_length() - 1,
        **_dot_options(hidden.dtype, hidden.shape[1]), **launch,
    )  # fmt: skip
    return _decode(best.view(rows, splits * k_pad).topk(k, dim=1).values)


def ranks_forward(hidden, weight, targets, exclude, excluded_ids):
    check_kernel_hidden_dim("triton", hidden.shape[1])
    hidden, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (hidden, weight))
    rows, num_items = hidden.shape[0], weight.shape[0]
    ranks = torch.zeros(rows, dtype=torch.int32, device=hidden.device)
    if rows == 0:
        return ranks.long()
    # Each item a row excludes once (sorted, repeats zeroed), none of excluded_ids (never counted).
    exclude = exclude.long().masked_fill(torch.isin(exclude.long(), excluded_ids.long()), 0).sort(dim=1).values
    exclude[:, 1:].masked_fill_(exclude[:, 1:] == exclude[:, :-1], 0)
    block, block_d, d_chunk, launch = _launch(hidden)
    items_per_split, splits = _splits(rows, num_items, block, 0, hidden.device)
    launch_kernel(_ranks_kernel, (cdiv(rows, block), splits),
        hidden, weight, targets.contiguous(), exclude, excluded_ids, ranks,
        hidden.stride(0), weight.stride(0), exclude.stride(0),
        rows, num_items, hidden.shape[1], exclude.shape[1], excluded_ids.numel(), items_per_split,
        BLOCK_B=block, BLOCK_D=block_d, D_CHUNK=d_chunk, **_dot_options(hidden.dtype, hidden.shape[1]), **launch,
    )  # fmt: skip
    return ranks.long()
