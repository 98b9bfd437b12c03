"""Sampled and full softmax losses in Triton, never materializing logits.

Same op-level contract as `seqrec_kernels/reference/softmax_loss.py`. Forward: each
program streams the item rows (negatives or the whole catalog) of a block of hidden rows
through an online log-sum-exp in float32 and writes the per-row loss and LSE. Backward
recomputes logit tiles from the LSE. Ignored rows (see "ignored rows" below) cost no
logits: the blocks hold only rows that count. The kernels write every element of their
outputs (0 at ignored rows), except the float32 item gradient the atomics accumulate.
Extra memory is O(T + N) beyond the gradients (plus O(T + G*K) sort indices in
deterministic mode).

Sampled, two layouts of negatives [G, K]:
- shared (rows_per_group > 1): a program's rows use the same list, so logits are a
  [BLOCK_T, BLOCK_K] tile product on tensor cores;
- per row (rows_per_group == 1): each row gathers its own [BLOCK_K, D] rows, logits are
  row-wise dot products.
d item_weight is a float32 scatter-add (relaxed atomics: each add needs no ordering with
any other memory access, so no fence or L1 invalidation per add) by default; under
torch.use_deterministic_algorithms(True) it is computed item by item over the sorted
sample slots instead, a tile of slots or rows at a time, in a fixed order.

Full: d hidden streams item tiles per row block; d item_weight streams the blocks of rows
that count per item block (no atomics, deterministic). Excluded items: see _exclusion.

Hidden sizes that are not a multiple of 16: see "padded operands" below.
"""

import math

import torch
import triton
import triton.language as tl

from .. import tuning
from .._limits import check_kernel_hidden_dim
from ..backends import triton_interpreted
from ._launch import cached_plan, cdiv, launch_kernel, next_power_of_2
from .attention import MAX_REGISTERS, _dot_chunk, _dot_options

_configs = tuning.derived_cache()  # _blocks's answers, by its arguments and the modes they read


def _blocks(hidden_dim, dtype, kernel, device, num_items):
    """(BLOCK_T, BLOCK_N, BLOCK_D, launch options, variant) of the tile kernels (shared
    negatives, full): today's defaults below unless the GPU's tuning table (seqrec_kernels.tuning)
    measured a faster configuration for `kernel` ("full_softmax_fwd", ...), the dtype, the
    hidden dim and the class of num_items (the items each row is scored against: the catalog,
    or the negatives). variant: the kernel's VARIANT_DEFAULTS keys (the full loss's candidates).
    Computed once per arguments and modes (a dictionary lookup per call; not to be modified)."""
    catalog = tuning.catalog_class(num_items)
    key = (hidden_dim, dtype, kernel, device, catalog, triton_interpreted(),
           torch.get_float32_matmul_precision())  # fmt: skip
    return cached_plan(_configs, key, _blocks_for, hidden_dim, dtype, kernel, device, num_items)


def _blocks_for(hidden_dim, dtype, kernel, device, num_items):
    block_d = max(16, next_power_of_2(hidden_dim))
    default = _default_config(kernel, block_d, hidden_dim, dtype)
    config = tuning.launch_config(kernel, tuning.loss_key(dtype, block_d, num_items), device, default)
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"], maxnreg=MAX_REGISTERS)
    variant = {name: config[name] for name in VARIANT_DEFAULTS.get(kernel, {})}
    return config["BLOCK_T"], config["BLOCK_N"], block_d, launch, variant


# The full loss's algorithm variants, today's choice first (candidates of the tuning sweep,
# benchmarks/tune.py): ITEM_SPLITS > 1 splits the catalog across that many programs per row
# block in the forward and the d hidden pass (partials merged by a second kernel; at most
# as many splits as bring the grid to SPLIT_PROGRAMS programs); FUSED computes d hidden in the
# d weight kernel from the same logit tiles (float32 atomics; never under
# torch.use_deterministic_algorithms, where today's kernels run).
VARIANT_DEFAULTS = {"full_softmax_fwd": dict(ITEM_SPLITS=1), "full_softmax_bwd": dict(ITEM_SPLITS=1, FUSED=False)}
SPLIT_PROGRAMS = 1024  # 8 per SM on an H100's 132


def _default_config(kernel, block_d, hidden_dim, dtype):
    """Today's configuration of `kernel`: _default_blocks and its VARIANT_DEFAULTS."""
    return dict(_default_blocks(block_d, hidden_dim, dtype), **VARIANT_DEFAULTS.get(kernel, {}))


def _item_splits(max_splits, row_blocks, num_items, block_n):
    """(splits, items per split) of a split candidate: up to max_splits, at least one item
    block each, no more than bring row_blocks x splits to SPLIT_PROGRAMS."""
    item_blocks = cdiv(num_items, block_n)
    splits = max(1, min(max_splits, item_blocks, cdiv(SPLIT_PROGRAMS, row_blocks)))
    blocks_per_split = cdiv(item_blocks, splits)
    return cdiv(item_blocks, blocks_per_split), blocks_per_split * block_n


def _default_blocks(block_d, hidden_dim, dtype):
    """Today's configuration: {BLOCK_T, BLOCK_N, num_warps, num_stages}."""
    if triton_interpreted():
        return dict(BLOCK_T=16, BLOCK_N=16, num_warps=4, num_stages=1)
    block_t = block_n = 64 if block_d <= 128 else 32 if block_d <= 256 else 16
    if dtype == torch.float32:  # operand tiles of twice the registers: 64 rows spilled KBs (IEEE or 3xTF32)
        block_t = block_n = max(16, block_t // 2)
    # 8 warps: with 4, the backward kernels (two [BT, BD] float32 tiles more, a gradient and
    # its update, and the addresses of the item-gradient atomics) and the D=50 forward spilled.
    num_warps = 8
    # Streamed item tiles in shared memory: 3 stages, fewer where they would pass 64 KB
    # (float32, D=1024: 3 x 64 KB is over the A100's 163 KB per block).
    tile_bytes = block_n * block_d * torch.empty((), dtype=dtype).element_size()
    num_stages = max(1, min(3, (64 * 1024) // tile_bytes))
    if _dot_options(dtype, hidden_dim)["DOT_PRECISION"] == "ieee" and dtype == torch.float32:
        num_stages = 1  # IEEE products wait on the FMA units, not on loads; 3 stages spilled 8 B at D=50 (sm_90)
    return dict(BLOCK_T=block_t, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _per_row_blocks(hidden_dim):
    """(BLOCK_T, BLOCK_K, BLOCK_D) for per-row negatives: a [T, K, D] register tile of at
    most 4,096 elements (8,192 spilled in the backward at 16-bit, D=64, sm_80: the tile's
    64-bit addresses for the item-gradient atomics take as many registers as its values)."""
    block_d = max(16, next_power_of_2(hidden_dim))
    block_k = max(1, min(16, 4096 // block_d))
    return max(1, 4096 // (block_k * block_d)), block_k, block_d


def _item_rows_block(block_d):
    """Slots or rows per step of the deterministic item-gradient kernel: a [BLOCK_T, BLOCK_D]
    float32 tile of at most 4,096 elements (64 x 1024 spilled kilobytes per thread)."""
    return 16 if triton_interpreted() else max(1, min(64, 4096 // block_d))


# ------------------------------------------------------------------------ padded operands

# At a hidden size that is not a multiple of 16 (SASRec's D=50) rows are not 16-byte aligned
# and `offs_d < D` is not constant over 8-element groups: loads are scalar and not pipelined
# (cp.async moves aligned 16-byte chunks). So, as FlashAttention does for odd head dims, an
# operand that a kernel reads more than once is first copied with zero columns up to a
# multiple of 16 (Triton specializes sizes and strides divisible by 16): the item table where
# more than one program reads it (full loss: more than one row block; sampled: gathers of at
# least twice its rows, below which the copy costs more than it saves), hidden where its rows
# are re-read (full backward: more than one item block; sampled backward: the deterministic
# item gradient, or D > 256 column chunks). The kernels read `h_cols` / `w_cols` columns of
# hidden / the table, write gradients unpadded (D columns), and read what is not padded ALIGN
# elements at a time (_aligned).


def _alignment(hidden_dim, *tensors):
    """ALIGN: the largest power of two, up to 16 bytes of elements, that divides D and the row
    stride of every tensor read or written ([rows, cols], unit column stride)."""
    return math.gcd(16 // tensors[0].element_size(), hidden_dim, *(t.stride(0) for t in tensors))


@triton.jit
def _aligned(values, ALIGN: tl.constexpr):
    """A tuple of sizes and strides (multiples of ALIGN) rounded down to multiples of ALIGN:
    the same values, but Triton now knows that rows are ALIGN-element aligned and loads and
    stores them ALIGN elements at a time (at D=50, unpadded rows 32 bits at a time, not 16)."""
    aligned = ()
    for i in tl.static_range(len(values)):
        aligned = aligned + (values[i] // ALIGN * ALIGN,)
    return aligned


def _pad_columns(*operands):
    """operands: (tensor [rows, D], re-read) pairs of one dtype and D. Each re-read one is
    replaced by a copy zero-padded to a multiple of 16 columns (if D is not one), all of
    them (at most two) in one launch."""
    cols = operands[0][0].shape[1]
    padded_cols = cdiv(cols, 16) * 16
    if cols == padded_cols:
        return [t for t, _ in operands]
    out = [torch.empty(t.shape[0], padded_cols, dtype=t.dtype, device=t.device) if reread else t
           for t, reread in operands]  # fmt: skip
    copies = [(t, copy) for (t, _), copy in zip(operands, out) if copy is not t]
    if copies:
        (a, padded_a), (b, padded_b) = copies[0], copies[-1]
        rows_b = b.shape[0] if len(copies) == 2 else 0  # one operand: no rows of a second
        block_c = next_power_of_2(padded_cols)
        block_r = max(1, 4096 // block_c)
        launch_kernel(_pad_columns_kernel, (cdiv(a.shape[0], block_r) + cdiv(rows_b, block_r),),
            a, padded_a, a.shape[0], a.stride(0), b, padded_b, rows_b, b.stride(0), cols, padded_cols,
            ALIGN=_alignment(cols, a, b), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        )  # fmt: skip
    return out


@triton.jit
def _pad_columns_kernel(A, PaddedA, rows_a, stride_a, B, PaddedB, rows_b, stride_b, cols, padded_cols,
                        ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Copies BLOCK_R rows of A (the first programs) or of B (the others) with their zero
    columns up to padded_cols: every element of the copies is written."""
    stride_a, stride_b, cols = _aligned((stride_a, stride_b, cols), ALIGN)
    block = tl.program_id(0)
    blocks_a = tl.cdiv(rows_a, BLOCK_R)
    if block < blocks_a:
        src, dst, num_rows, stride = A, PaddedA, rows_a, stride_a
    else:
        src, dst, num_rows, stride = B, PaddedB, rows_b, stride_b
        block -= blocks_a
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C)
    row_mask = rows[:, None] < num_rows
    x = tl.load(src + rows[:, None].to(tl.int64) * stride + offs_c[None, :], mask=row_mask & (offs_c[None, :] < cols),
                other=0.0)  # fmt: skip
    tl.store(dst + rows[:, None].to(tl.int64) * padded_cols + offs_c[None, :], x,
             mask=row_mask & (offs_c[None, :] < padded_cols))  # fmt: skip


# ------------------------------------------------------------------------ ignored rows

# Rows whose positive/target is ignore_index (or outside [0, N)) cost nothing: a first
# kernel compacts each segment of rows (consecutive rows of one group that shares
# negatives, at most MAX_SEGMENT_ROWS) so that its rows that count come first, and the
# loss kernels read rows through that order: tiles are dense over rows that count, and a
# program whose slots hold only ignored rows writes their zeros and exits. All on the
# device (no host sync); the backward compacts again (the ops save no order).
MAX_SEGMENT_ROWS = 1024


def _row_segments(rows_per_group, block_t):
    """How rows are compacted and tiled. Each group of `rows_per_group` rows is cut into
    segments of SEGMENT rows (a power of two), each segment into blocks of BLOCK_T slots,
    one program per block: program = (group * segments_per_group + segment) *
    blocks_per_segment + block, on one grid axis (millions of rows fit CUDA's limits).
    Returns (rows_per_group, segments_per_group, blocks_per_segment, SEGMENT)."""
    segment = min(MAX_SEGMENT_ROWS, next_power_of_2(rows_per_group))
    blocks_per_segment = cdiv(min(rows_per_group, segment), block_t)
    return rows_per_group, cdiv(rows_per_group, segment), blocks_per_segment, segment


def _compact(ids, num_items, ignore_index, segments):
    """(order [T] int32, count [S] int32) from _compact_rows_kernel, ids [T] the positives/targets."""
    rows_per_group, segments_per_group, _, segment = segments
    num_segments = cdiv(ids.shape[0], rows_per_group) * segments_per_group
    order = torch.empty(ids.shape[0], dtype=torch.int32, device=ids.device)
    count = torch.empty(num_segments, dtype=torch.int32, device=ids.device)
    launch_kernel(_compact_rows_kernel, (num_segments,),
        ids, order, count, ids.shape[0], num_items, rows_per_group, segments_per_group, ignore_index,
        SEGMENT=segment, num_warps=4,
    )  # fmt: skip
    return order, count


@triton.jit
def _compact_rows_kernel(
    Ids, Order, Count, num_rows, num_items, rows_per_group, segments_per_group, ignore_index, SEGMENT: tl.constexpr
):
    """One program per segment: Order holds the segment's rows that count (id not
    ignore_index, in [0, N)) in their order, then its ignored rows; Count how many count."""
    segment = tl.program_id(0)
    first_local = (segment % segments_per_group) * SEGMENT
    first = (segment // segments_per_group) * rows_per_group + first_local
    local = tl.arange(0, SEGMENT)
    in_segment = (local < rows_per_group - first_local) & (first + local < num_rows)
    ids = tl.load(Ids + first + local, mask=in_segment, other=ignore_index)
    counts = in_segment & (ids != ignore_index) & (ids >= 0) & (ids < num_items)
    ignored = in_segment & (counts == 0)
    num_counted = tl.sum(counts.to(tl.int32), 0)
    slot = tl.where(counts, tl.cumsum(counts.to(tl.int32), 0), num_counted + tl.cumsum(ignored.to(tl.int32), 0)) - 1
    tl.store(Order + first + slot, first + local, mask=in_segment)
    tl.store(Count + segment, num_counted)


@triton.jit
def _compacted_rows(Order, Count, num_rows, rows_per_group, segments_per_group, blocks_per_segment, segment_rows,
                    BLOCK_T: tl.constexpr):  # fmt: skip
    """This program's rows [BT] (read through Order), which of them count (its slots below
    the segment's Count), which are ignored (its other slots in the segment), the group,
    and whether no row counts (the program only writes zeros)."""
    segment = tl.program_id(0) // blocks_per_segment
    group = segment // segments_per_group
    first_local = (segment % segments_per_group) * segment_rows
    first = group * rows_per_group + first_local
    block_start = (tl.program_id(0) % blocks_per_segment) * BLOCK_T
    slots = block_start + tl.arange(0, BLOCK_T)
    in_segment = (slots < rows_per_group - first_local) & (first + slots < num_rows)
    rows = tl.load(Order + first + slots, mask=in_segment, other=0)
    count = tl.load(Count + segment)
    return rows, in_segment & (slots < count), in_segment & (slots >= count), group, block_start >= count


# ------------------------------------------------------------------------ sampled


@triton.jit
def _sampled_rows(Order, Count, num_rows, rows_per_group, segments_per_group, blocks_per_segment, segment_rows,
                  PER_ROW: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """_compacted_rows, with the group whose negatives each row uses: a scalar when shared,
    the rows themselves [BT] per row (there all rows form one group of compaction, each
    row carrying its own list)."""
    rows, counted, ignored, group, idle = _compacted_rows(
        Order, Count, num_rows, rows_per_group, segments_per_group, blocks_per_segment, segment_rows, BLOCK_T
    )
    if PER_ROW:
        group = rows
    return rows, counted, ignored, group, idle


@triton.jit
def _scores(h, H, rows, row_mask, stride_h, h_cols, w, W, ids, present, stride_w, w_cols,
            DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """h [BT, BD] @ w [BN, BD]^T in float32 [BT, BN]: h holds hidden rows `rows` (mask
    row_mask), w the table's rows `ids` (mask present). At DOT_CHUNK < BD (_dot_chunk) the
    product runs over column chunks loaded again from H and W (cache hits), not from h and w."""
    BLOCK_D: tl.constexpr = h.shape[1]
    if DOT_CHUNK == BLOCK_D:
        return tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    acc = tl.zeros([h.shape[0], w.shape[0]], tl.float32)
    for start in range(0, BLOCK_D, DOT_CHUNK):
        offs_c = start + tl.arange(0, DOT_CHUNK)
        h_c = tl.load(H + rows[:, None].to(tl.int64) * stride_h + offs_c[None, :],
                      mask=row_mask[:, None] & (offs_c[None, :] < h_cols), other=0.0)  # fmt: skip
        w_c = tl.load(W + ids[:, None].to(tl.int64) * stride_w + offs_c[None, :],
                      mask=present[:, None] & (offs_c[None, :] < w_cols), other=0.0)  # fmt: skip
        acc = tl.dot(h_c.to(DOT_DTYPE), tl.trans(w_c.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _positive_logits(
    H, W, Pos, PosLogQ, rows, row_mask, offs_d, stride_h, stride_w, num_items, h_cols, w_cols, inv_temp,
    ignore_index, HAS_POS_LOGQ: tl.constexpr,
):  # fmt: skip
    """hidden [BT, BD] float32, positive ids [BT], real-row mask [BT], positive weights and logits."""
    h = tl.load(H + rows[:, None].to(tl.int64) * stride_h + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d[None, :] < h_cols), other=0.0)  # fmt: skip
    pos = tl.load(Pos + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (pos != ignore_index) & (pos >= 0) & (pos < num_items)
    w_pos = tl.load(
        W + tl.where(valid, pos, 0)[:, None].to(tl.int64) * stride_w + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < w_cols), other=0.0,
    ).to(tl.float32)  # fmt: skip
    logits = tl.sum(h.to(tl.float32) * w_pos, 1) * inv_temp
    if HAS_POS_LOGQ:
        logits -= tl.load(PosLogQ + rows, mask=valid, other=0.0).to(tl.float32)
    return h, pos, valid, w_pos, logits


@triton.jit
def _negative_logits(
    h, H, rows, W, Neg, NegLogQ, group, row_mask, pos, offs_k, offs_d, stride_h, stride_w, stride_neg, num_items,
    num_neg, h_cols, w_cols, inv_temp,
    HAS_NEG_LOGQ: tl.constexpr, REMOVE_HITS: tl.constexpr, PER_ROW: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Logits [BT, BK] of a block of negatives (-inf where absent or an accidental hit),
    their ids and their weights ([BK, BD] shared, [BT, BK, BD] per row)."""
    d_mask = offs_d < w_cols
    if PER_ROW:
        ids_ptr = Neg + group[:, None].to(tl.int64) * stride_neg + offs_k[None, :]  # [BT, BK]
        ids = tl.load(ids_ptr, mask=row_mask[:, None] & (offs_k[None, :] < num_neg), other=-1)
        present = (ids >= 0) & (ids < num_items)
        w = tl.load(
            W + tl.where(present, ids, 0)[:, :, None].to(tl.int64) * stride_w + offs_d[None, None, :],
            mask=present[:, :, None] & d_mask[None, None, :], other=0.0,
        )  # fmt: skip
        logits = tl.sum(h.to(tl.float32)[:, None, :] * w.to(tl.float32), 2) * inv_temp
        if HAS_NEG_LOGQ:
            logits -= tl.load(NegLogQ + group[:, None].to(tl.int64) * stride_neg + offs_k[None, :],
                              mask=present, other=0.0).to(tl.float32)  # fmt: skip
    else:
        ids = tl.load(Neg + group.to(tl.int64) * stride_neg + offs_k, mask=offs_k < num_neg, other=-1)
        present = (ids >= 0) & (ids < num_items)  # [BK]
        w = tl.load(
            W + tl.where(present, ids, 0)[:, None].to(tl.int64) * stride_w + offs_d[None, :],
            mask=present[:, None] & d_mask[None, :], other=0.0,
        )  # fmt: skip
        ids_w = tl.where(present, ids, 0)
        logits = _scores(h, H, rows, row_mask, stride_h, h_cols, w, W, ids_w, present, stride_w, w_cols, DOT_CHUNK,
                         DOT_DTYPE, DOT_PRECISION) * inv_temp  # fmt: skip
        if HAS_NEG_LOGQ:
            logits -= tl.load(NegLogQ + group.to(tl.int64) * stride_neg + offs_k, mask=present, other=0.0).to(
                tl.float32
            )[None, :]
        ids = ids[None, :]
        present = present[None, :]
    keep = present
    if REMOVE_HITS:
        keep &= ids != pos[:, None]
    return tl.where(keep, logits, -float("inf")), ids, w


@triton.jit
def _sampled_fwd_kernel(
    H, W, Pos, Neg, PosLogQ, NegLogQ, Loss, Lse, Order, Count,
    stride_h, stride_w, stride_neg,
    num_rows, num_items, num_neg, h_cols, w_cols, rows_per_group, segments_per_group, blocks_per_segment, segment_rows,
    inv_temp, ignore_index,
    HAS_POS_LOGQ: tl.constexpr, HAS_NEG_LOGQ: tl.constexpr, REMOVE_HITS: tl.constexpr, PER_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    stride_h, stride_w, h_cols, w_cols = _aligned((stride_h, stride_w, h_cols, w_cols), ALIGN)
    rows, row_mask, ignored, group, idle = _sampled_rows(
        Order, Count, num_rows, rows_per_group, segments_per_group, blocks_per_segment, segment_rows, PER_ROW, BLOCK_T
    )
    tl.store(Loss + rows, 0.0, mask=ignored)
    tl.store(Lse + rows, 0.0, mask=ignored)
    if idle:
        return
    offs_d = tl.arange(0, BLOCK_D)
    # Distinct names for unused results: a name re-bound inside the loop below would be a
    # loop-carried value whose type changes (float32 -> bfloat16), which the compiler rejects.
    h, pos, valid, _w_pos, pos_logits = _positive_logits(
        H, W, Pos, PosLogQ, rows, row_mask, offs_d, stride_h, stride_w, num_items, h_cols, w_cols, inv_temp,
        ignore_index, HAS_POS_LOGQ,
    )  # fmt: skip
    running_max = pos_logits  # the positive is always in the denominator
    running_sum = tl.full([BLOCK_T], 1.0, tl.float32)
    for k_start in range(0, num_neg, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        logits, _ids, _w = _negative_logits(
            h, H, rows, W, Neg, NegLogQ, group, row_mask, pos, offs_k, offs_d, stride_h, stride_w, stride_neg,
            num_items, num_neg, h_cols, w_cols, inv_temp, HAS_NEG_LOGQ, REMOVE_HITS, PER_ROW, DOT_CHUNK, DOT_DTYPE,
            DOT_PRECISION,
        )  # fmt: skip
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(Lse + rows, lse, mask=row_mask)
    tl.store(Loss + rows, tl.where(valid, lse - pos_logits, 0.0), mask=row_mask)


@triton.jit
def _sampled_bwd_kernel(
    H, W, Pos, Neg, PosLogQ, NegLogQ, Lse, GradLoss, DH, DW, Order, Count,
    stride_h, stride_w, stride_neg, stride_grad, stride_dh, stride_dw,
    num_rows, num_items, num_neg, hidden_dim, h_cols, w_cols, rows_per_group, segments_per_group, blocks_per_segment,
    segment_rows, inv_temp, ignore_index,
    HAS_POS_LOGQ: tl.constexpr, HAS_NEG_LOGQ: tl.constexpr, REMOVE_HITS: tl.constexpr, PER_ROW: tl.constexpr,
    SCATTER_DW: tl.constexpr, D_CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """d hidden for a block of rows; with SCATTER_DW also d weight by float32 atomics. Both
    written unpadded: hidden_dim (D) columns."""
    stride_h, stride_w, stride_dh, stride_dw = _aligned((stride_h, stride_w, stride_dh, stride_dw), ALIGN)
    hidden_dim, h_cols, w_cols = _aligned((hidden_dim, h_cols, w_cols), ALIGN)
    rows, row_mask, ignored, group, idle = _sampled_rows(
        Order, Count, num_rows, rows_per_group, segments_per_group, blocks_per_segment, segment_rows, PER_ROW, BLOCK_T
    )
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < hidden_dim
    if idle:  # only ignored rows: d hidden 0
        tl.store(DH + rows[:, None].to(tl.int64) * stride_dh + offs_d[None, :], 0.0, mask=ignored[:, None] & d_mask)
        return
    h, pos, valid, w_pos, pos_logits = _positive_logits(
        H, W, Pos, PosLogQ, rows, row_mask, offs_d, stride_h, stride_w, num_items, h_cols, w_cols, inv_temp,
        ignore_index, HAS_POS_LOGQ,
    )  # fmt: skip
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
    # d loss / d logit = softmax - onehot(positive), times upstream gradient / temperature.
    row_scale = tl.where(valid, tl.load(GradLoss + rows * stride_grad, mask=row_mask, other=0.0) * inv_temp, 0.0)
    pos_coef = (tl.exp(pos_logits - lse) - 1.0) * row_scale  # [BT]
    dh = pos_coef[:, None] * w_pos
    if SCATTER_DW:
        dw_pos_ptr = DW + tl.where(valid, pos, 0)[:, None].to(tl.int64) * stride_dw + offs_d[None, :]
        tl.atomic_add(
            dw_pos_ptr, pos_coef[:, None] * h.to(tl.float32), mask=valid[:, None] & d_mask[None, :], sem="relaxed"
        )
    for k_start in range(0, num_neg, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        logits, ids, w = _negative_logits(
            h, H, rows, W, Neg, NegLogQ, group, row_mask, pos, offs_k, offs_d, stride_h, stride_w, stride_neg,
            num_items, num_neg, h_cols, w_cols, inv_temp, HAS_NEG_LOGQ, REMOVE_HITS, PER_ROW, DOT_CHUNK, DOT_DTYPE,
            DOT_PRECISION,
        )  # fmt: skip
        coef = tl.exp(logits - lse[:, None]) * row_scale[:, None]  # [BT, BK], 0 where absent
        present = (ids >= 0) & (ids < num_items)
        if PER_ROW:
            dh += tl.sum(coef[:, :, None] * w.to(tl.float32), 1)
            if SCATTER_DW:
                dw_ptr = DW + tl.where(present, ids, 0)[:, :, None].to(tl.int64) * stride_dw + offs_d[None, None, :]
                contribution = coef[:, :, None] * h.to(tl.float32)[:, None, :]  # [BT, BK, BD]
                tl.atomic_add(dw_ptr, contribution, mask=present[:, :, None] & d_mask[None, None, :], sem="relaxed")
        else:
            dh += tl.dot(coef.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            if SCATTER_DW:
                # [BK, BD]: every row of the block against each negative, in column chunks of
                # h re-read from cache, so that no [BK, BD] tile of atomic addresses (64-bit
                # each) is live beside dh: at D=1024 that spilled.
                coef_t = tl.trans(coef).to(DOT_DTYPE)
                present_k = tl.reshape(present, [BLOCK_K])
                dw_rows = DW + tl.where(present_k, tl.reshape(ids, [BLOCK_K]), 0).to(tl.int64) * stride_dw  # [BK]
                if D_CHUNK == BLOCK_D:
                    dw_tile = tl.dot(coef_t, h.to(DOT_DTYPE), input_precision=DOT_PRECISION)
                    dw_mask = present_k[:, None] & d_mask[None, :]
                    tl.atomic_add(dw_rows[:, None] + offs_d[None, :], dw_tile, mask=dw_mask, sem="relaxed")
                else:
                    for d_start in tl.static_range(0, BLOCK_D, D_CHUNK):
                        offs_c = d_start + tl.arange(0, D_CHUNK)
                        h_c = tl.load(H + rows[:, None].to(tl.int64) * stride_h + offs_c[None, :],
                                      mask=row_mask[:, None] & (offs_c[None, :] < h_cols), other=0.0)  # fmt: skip
                        dw_c = tl.dot(coef_t, h_c.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # [BK, DC]
                        c_mask = present_k[:, None] & (offs_c[None, :] < hidden_dim)
                        tl.atomic_add(dw_rows[:, None] + offs_c[None, :], dw_c, mask=c_mask, sem="relaxed")
    # The rows that count, and 0 at this block's ignored ones. The rows loaded again, as in
    # _full_bwd_hidden_kernel, and a pointer tile made here: not live through the loop.
    rows, row_mask, ignored, _group, _idle = _sampled_rows(
        Order, Count, num_rows, rows_per_group, segments_per_group, blocks_per_segment, segment_rows, PER_ROW, BLOCK_T
    )
    dh_ptr = DH + rows[:, None].to(tl.int64) * stride_dh + offs_d[None, :]
    dh = tl.where(row_mask[:, None], dh, 0.0)
    tl.store(dh_ptr, dh.to(DH.dtype.element_ty), mask=(row_mask | ignored)[:, None] & d_mask[None, :])


@triton.jit
def _slot_log_q(PosLogQ, NegLogQ, slot, in_range, num_rows, num_neg, stride_neg,
                HAS_POS_LOGQ: tl.constexpr, HAS_NEG_LOGQ: tl.constexpr):  # fmt: skip
    """log q of sample slots (a block [BS] or a scalar), 0 where not given."""
    is_positive = slot < num_rows
    neg_slot = tl.maximum(slot - num_rows, 0)
    log_q = tl.zeros(slot.shape, tl.float32)
    if HAS_POS_LOGQ:
        log_q += tl.load(PosLogQ + slot, mask=in_range & is_positive, other=0.0).to(tl.float32)
    if HAS_NEG_LOGQ:
        neg_log_q_ptr = NegLogQ + (neg_slot // num_neg) * stride_neg + neg_slot % num_neg
        log_q += tl.load(neg_log_q_ptr, mask=in_range & ~is_positive, other=0.0).to(tl.float32)
    return log_q


@triton.jit
def _item_grad_rows(H, Pos, Lse, GradLoss, rows, row_mask, is_positive, log_q, w, item, offs_d, stride_h, stride_grad,
                    num_items, h_cols, inv_temp, ignore_index, REMOVE_HITS: tl.constexpr):  # fmt: skip
    """d item_weight[item] from a block of rows [BT] (a [BT, BD] tile of hidden), summed over
    the block by tl.sum: a fixed tree, the same on every run. A positive (is_positive, per
    row or for all) gives softmax - 1, a negative softmax, without the rows it would hit."""
    h = tl.load(H + rows[:, None].to(tl.int64) * stride_h + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d[None, :] < h_cols), other=0.0).to(tl.float32)  # fmt: skip
    pos = tl.load(Pos + rows, mask=row_mask, other=ignore_index)
    keep = row_mask & (pos != ignore_index) & (pos >= 0) & (pos < num_items)  # out of range: ignored
    if REMOVE_HITS:
        keep &= is_positive | (pos != item)
    logits = tl.sum(h * w[None, :], 1) * inv_temp - log_q
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
    grad = tl.load(GradLoss + rows * stride_grad, mask=row_mask, other=0.0)
    coef = tl.exp(tl.where(keep, logits - lse, -float("inf"))) - is_positive.to(tl.float32)
    return tl.sum(tl.where(keep, coef * grad * inv_temp, 0.0)[:, None] * h, 0)


@triton.jit
def _sampled_dw_by_item_kernel(
    H, W, Pos, PosLogQ, NegLogQ, Lse, GradLoss, DW, SlotOrder, SlotStart, Order, Count,
    stride_h, stride_w, stride_neg, stride_grad, stride_dw,
    num_rows, num_items, num_neg, hidden_dim, h_cols, w_cols, rows_per_group, segments_per_group, segment_rows,
    inv_temp, ignore_index,
    HAS_POS_LOGQ: tl.constexpr, HAS_NEG_LOGQ: tl.constexpr, REMOVE_HITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Deterministic d weight: one program per item sums, in a fixed order, the contributions
    of every sample slot holding that item (slot s < T: row s's positive; slot T + g * K + k:
    negative k of group g; ignored rows own none). Slots of one row (positives, per-row
    negatives) go BLOCK_T at a time, a [BLOCK_T, BLOCK_D] tile of their rows; a shared
    list's slot walks the rows of its group that count, BLOCK_T at a time, segment by
    segment through the compacted Order. No atomics: bitwise reproducible."""
    stride_h, stride_w, stride_dw = _aligned((stride_h, stride_w, stride_dw), ALIGN)
    hidden_dim, h_cols, w_cols = _aligned((hidden_dim, h_cols, w_cols), ALIGN)
    item = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    w = tl.load(W + item.to(tl.int64) * stride_w + offs_d, mask=offs_d < w_cols, other=0.0).to(tl.float32)
    # The item's sorted slots: its positives in [first, negatives), its negatives in [negatives, last).
    first = tl.load(SlotStart + 2 * item)
    negatives = tl.load(SlotStart + 2 * item + 1)
    last = tl.load(SlotStart + 2 * item + 2)
    one_row_end = tl.where(rows_per_group == 1, last, negatives)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(first, one_row_end, BLOCK_T):
        i = start + tl.arange(0, BLOCK_T)
        in_range = i < one_row_end
        slot = tl.load(SlotOrder + i, mask=in_range, other=0)
        is_positive = slot < num_rows
        rows = tl.where(is_positive, slot, (slot - num_rows) // num_neg)  # a per-row list's group is its row
        log_q = _slot_log_q(PosLogQ, NegLogQ, slot, in_range, num_rows, num_neg, stride_neg, HAS_POS_LOGQ, HAS_NEG_LOGQ)
        acc += _item_grad_rows(H, Pos, Lse, GradLoss, rows, in_range, is_positive, log_q, w, item, offs_d, stride_h,
                               stride_grad, num_items, h_cols, inv_temp, ignore_index, REMOVE_HITS)  # fmt: skip
    for i in range(one_row_end, last):  # negatives of shared lists
        slot = tl.load(SlotOrder + i)
        log_q = _slot_log_q(PosLogQ, NegLogQ, slot, i < last, num_rows, num_neg, stride_neg, HAS_POS_LOGQ, HAS_NEG_LOGQ)
        group = (slot - num_rows) // num_neg
        for segment in range(group * segments_per_group, (group + 1) * segments_per_group):
            first_row = group * rows_per_group + (segment - group * segments_per_group) * segment_rows
            count = tl.load(Count + segment)
            for block in range(0, count, BLOCK_T):
                local = block + tl.arange(0, BLOCK_T)
                row_mask = local < count
                rows = tl.load(Order + first_row + local, mask=row_mask, other=0)
                acc += _item_grad_rows(H, Pos, Lse, GradLoss, rows, row_mask, slot < num_rows, log_q, w, item, offs_d,
                                       stride_h, stride_grad, num_items, h_cols, inv_temp, ignore_index,
                                       REMOVE_HITS)  # fmt: skip
    tl.store(DW + item.to(tl.int64) * stride_dw + offs_d, acc.to(DW.dtype.element_ty), mask=offs_d < hidden_dim)


def _sampled_launch(hidden, neg_ids, rows_per_group, pos_log_q, neg_log_q, remove_hits, backward):
    """(grid, row segments (see _row_segments), meta) of the sampled forward/backward kernels."""
    per_row = rows_per_group == 1
    if per_row:
        block_t, block_k, block_d = _per_row_blocks(hidden.shape[1])
        launch = dict(num_warps=8, maxnreg=MAX_REGISTERS)  # 4 warps spilled at D=50 under Triton 3.6
        groups, segments = 1, _row_segments(hidden.shape[0], block_t)  # compacted together: each row has its list
    else:
        block_t, block_k, block_d, launch, _ = _blocks(hidden.shape[1], hidden.dtype, "sampled_softmax", hidden.device,
                                                       neg_ids.shape[-1])  # fmt: skip
        # 16 negatives per step in the backward (the item-gradient tile [BK, BD] and its atomics'
        # addresses: 32 spilled) and in the float32 forward (32 spilled 8 B at D=50, IEEE products).
        if backward or hidden.dtype == torch.float32:
            block_k = 16
        groups, segments = neg_ids.shape[0], _row_segments(rows_per_group, block_t)
    _, segments_per_group, blocks_per_segment, _ = segments
    grid = (groups * segments_per_group * blocks_per_segment,)
    meta = dict(
        HAS_POS_LOGQ=pos_log_q is not None, HAS_NEG_LOGQ=neg_log_q is not None, REMOVE_HITS=remove_hits,
        PER_ROW=per_row, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=block_d,
        DOT_CHUNK=_dot_chunk(hidden.dtype, block_d), **launch,
        **_dot_options(hidden.dtype, hidden.shape[1]),
    )  # fmt: skip
    return grid, segments, meta


def _gathers_table_twice(num_rows, num_items, num_neg, grid, per_row):
    """Whether the sampled kernels gather at least twice as many item rows (each row's
    positive, each program's negatives) as the table has: the pad rule of the table."""
    return num_rows + (num_rows if per_row else grid[0]) * num_neg >= 2 * num_items


def _contiguous_rows(*tensors):
    """Unit stride on the last dim for every tensor given (None passes through)."""
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors]


def sampled_forward(
    hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, rows_per_group, remove_hits, temperature, ignore_index
):
    check_kernel_hidden_dim("triton", hidden.shape[1])
    hidden, weight, neg_ids, neg_log_q = _contiguous_rows(hidden, weight, neg_ids, neg_log_q)
    pos_ids, pos_log_q = (t if t is None else t.contiguous() for t in (pos_ids, pos_log_q))
    num_rows = hidden.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)  # every row written (0 where ignored)
    lse = torch.empty_like(loss)
    if num_rows == 0:
        return loss, lse
    num_items, num_neg = weight.shape[0], neg_ids.shape[1]
    grid, segments, meta = _sampled_launch(hidden, neg_ids, rows_per_group, pos_log_q, neg_log_q, remove_hits, False)
    order, count = _compact(pos_ids, num_items, ignore_index, segments)
    (weight,) = _pad_columns((weight, _gathers_table_twice(num_rows, num_items, num_neg, grid, meta["PER_ROW"])))
    launch_kernel(_sampled_fwd_kernel, grid,
        hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, loss, lse, order, count,
        hidden.stride(0), weight.stride(0), neg_ids.stride(0),
        num_rows, num_items, num_neg, hidden.shape[1], weight.shape[1], *segments,
        1.0 / temperature, ignore_index, ALIGN=_alignment(hidden.shape[1], hidden, weight), **meta,
    )  # fmt: skip
    return loss, lse


def _sample_slots(pos_ids, neg_ids, num_items, ignore_index, rows_per_group):
    """Sample slots sorted by (item, negative) (stable: in slot order within each) and where
    they start [2N + 1]: item i's positives at [starts[2i], starts[2i + 1]), its negatives up
    to starts[2i + 2]. Ignored rows own no slot, nor do the negatives of a list whose rows
    are all ignored."""
    out_of_range = num_items  # sorts after every real item: slots nobody owns
    valid = (pos_ids != ignore_index) & (pos_ids >= 0) & (pos_ids < num_items)  # [T]
    pos = torch.where(valid, pos_ids, out_of_range)
    used = valid.view(-1, rows_per_group).any(1)[:, None] & (neg_ids >= 0) & (neg_ids < num_items)  # [G, K]
    neg = torch.where(used, neg_ids, out_of_range).reshape(-1)
    keys, order = torch.sort(torch.cat([pos.long() * 2, neg.long() * 2 + 1]), stable=True)
    starts = torch.searchsorted(keys, torch.arange(2 * num_items + 1, device=pos_ids.device))
    return order, starts


def sampled_backward(
    grad_loss, hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, lse,
    rows_per_group, remove_hits, temperature, ignore_index, deterministic,
):  # fmt: skip
    check_kernel_hidden_dim("triton", hidden.shape[1])
    hidden, weight, neg_ids, neg_log_q = _contiguous_rows(hidden, weight, neg_ids, neg_log_q)
    pos_ids, pos_log_q = (t if t is None else t.contiguous() for t in (pos_ids, pos_log_q))
    num_rows, num_items = hidden.shape[0], weight.shape[0]
    d_hidden = torch.empty_like(hidden)  # every row written (0 where ignored)
    if num_rows == 0:
        return d_hidden, torch.zeros_like(weight)
    grid, segments, meta = _sampled_launch(hidden, neg_ids, rows_per_group, pos_log_q, neg_log_q, remove_hits, True)
    # The item gradient item by item (deterministic, and float32 rows wider than 256, where
    # the scatter beside d hidden spilled), or scattered by the row kernel's float32 atomics:
    # the one output that must start at zero.
    by_item = deterministic or (hidden.dtype == torch.float32 and meta["BLOCK_D"] > 256)
    scatter = not by_item
    d_weight = torch.zeros_like(weight, dtype=torch.float32) if scatter else torch.empty_like(weight)
    order, count = _compact(pos_ids, num_items, ignore_index, segments)
    num_neg, hidden_dim = neg_ids.shape[1], hidden.shape[1]
    hidden, weight = _pad_columns(
        (hidden, by_item or meta["BLOCK_D"] > 256),  # the item gradient's rows, or column chunks
        (weight, _gathers_table_twice(num_rows, num_items, num_neg, grid, meta["PER_ROW"])),
    )
    sizes = (num_rows, num_items, num_neg, hidden_dim, hidden.shape[1], weight.shape[1])
    align = _alignment(hidden_dim, hidden, weight, d_hidden)
    launch_kernel(_sampled_bwd_kernel, grid,
        hidden, weight, pos_ids, neg_ids, pos_log_q, neg_log_q, lse, grad_loss, d_hidden, d_weight, order, count,
        hidden.stride(0), weight.stride(0), neg_ids.stride(0), grad_loss.stride(0), d_hidden.stride(0),
        d_weight.stride(0), *sizes, *segments, 1.0 / temperature, ignore_index, SCATTER_DW=scatter,
        D_CHUNK=min(meta["BLOCK_D"], 256), ALIGN=align, **meta,
    )  # fmt: skip
    if by_item:
        slots, starts = _sample_slots(pos_ids, neg_ids, num_items, ignore_index, rows_per_group)
        _, segments_per_group, _, segment_rows = segments
        launch_kernel(_sampled_dw_by_item_kernel, (num_items,),
            hidden, weight, pos_ids, pos_log_q, neg_log_q, lse, grad_loss, d_weight, slots, starts, order, count,
            hidden.stride(0), weight.stride(0), neg_ids.stride(0), grad_loss.stride(0), d_weight.stride(0),
            *sizes, rows_per_group, segments_per_group, segment_rows, 1.0 / temperature, ignore_index,
            HAS_POS_LOGQ=meta["HAS_POS_LOGQ"], HAS_NEG_LOGQ=meta["HAS_NEG_LOGQ"], REMOVE_HITS=remove_hits,
            BLOCK_T=_item_rows_block(meta["BLOCK_D"]), BLOCK_D=meta["BLOCK_D"], ALIGN=align,
            num_warps=8, maxnreg=MAX_REGISTERS,  # 4 warps spilled at D=50 under Triton 3.6
        )  # fmt: skip
    return d_hidden, d_weight.to(weight.dtype)


# ------------------------------------------------------------------------ full


# Excluded items (sorted, unique ids). A runtime loop over them inside the item loop kept
# Triton from pipelining the item stream (cp.async). Up to MAX_UNROLLED_EXCLUDED ids (a
# compile per count: counts are small and fixed in a training run) are loaded once, as
# scalars, before the item loop; beyond, the launcher hands an int8 mask [N] instead (1 =
# excluded; a fill and an index_put per call), read once per item tile.
MAX_UNROLLED_EXCLUDED = 8


def _exclusion(excluded_ids, num_items):
    """(Excluded: the ids or the mask, the constexprs of _kept_items) for these excluded ids."""
    count = excluded_ids.numel()
    if count <= MAX_UNROLLED_EXCLUDED:
        return excluded_ids, dict(NUM_EXCLUDED=count, EXCLUDED_MASK=False)
    mask = torch.zeros(num_items, dtype=torch.int8, device=excluded_ids.device)
    mask[excluded_ids] = 1
    return mask, dict(NUM_EXCLUDED=0, EXCLUDED_MASK=True)


@triton.jit
def _excluded_ids(Excluded, NUM_EXCLUDED: tl.constexpr):
    """The excluded ids: a tuple of NUM_EXCLUDED scalars."""
    ids = ()
    for e in tl.static_range(NUM_EXCLUDED):
        ids = ids + (tl.load(Excluded + e),)
    return ids


@triton.jit
def _kept_items(n_start, num_items, Excluded, excluded_ids, BLOCK_N: tl.constexpr, NUM_EXCLUDED: tl.constexpr,
                EXCLUDED_MASK: tl.constexpr):  # fmt: skip
    """[BN] mask of the items n_start + [0, BN) in [0, N) that are not excluded. The ids set
    bits of one scalar (bit i: item n_start + i), tested once per item: compared with each id
    instead, each thread's items kept hoisted copies of every id (~10 registers per id)."""
    tl.static_assert(BLOCK_N <= 64)  # bits of an int64
    offs = tl.arange(0, BLOCK_N)
    kept = n_start + offs < num_items
    if NUM_EXCLUDED > 0:
        bits = tl.zeros([], tl.int64)
        for e in tl.static_range(NUM_EXCLUDED):
            local = excluded_ids[e] - n_start
            in_block = (local >= 0) & (local < BLOCK_N)
            bits |= tl.where(in_block, tl.full([], 1, tl.int64) << tl.where(in_block, local, 0).to(tl.int64), 0)
        kept &= ((bits >> offs.to(tl.int64)) & 1) == 0
    if EXCLUDED_MASK:
        kept &= tl.load(Excluded + n_start + offs, mask=kept, other=1) == 0
    return kept


@triton.jit
def _item_logits(h, H, rows, row_mask, W, offs_n, kept, offs_d, stride_h, stride_w, num_items, h_cols, w_cols,
                 inv_temp, DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Logits [BT, BN] of a row block against an item block (-inf where not kept: excluded
    or absent items) and the item weights [BN, BD]. Forward and both backward kernels use
    this one product, so the recomputed logits match the LSE's bit for bit."""
    present = offs_n < num_items
    w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_w + offs_d[None, :],
                mask=present[:, None] & (offs_d[None, :] < w_cols), other=0.0)  # fmt: skip
    logits = _scores(h, H, rows, row_mask, stride_h, h_cols, w, W, offs_n, present, stride_w, w_cols, DOT_CHUNK,
                     DOT_DTYPE, DOT_PRECISION) * inv_temp  # fmt: skip
    return tl.where(kept[None, :], logits, -float("inf")), w


@triton.jit
def _full_fwd_kernel(
    H, W, Targets, Excluded, Loss, Lse, Order, Count, Part,
    stride_h, stride_w,
    num_rows, num_items, h_cols, w_cols, inv_temp, ignore_index,
    num_segments, blocks_per_segment, segment_rows, items_per_split,
    NUM_EXCLUDED: tl.constexpr, EXCLUDED_MASK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Loss and LSE of a block of rows against the catalog; with SPLIT (a tuning candidate),
    against split program_id(1)'s items only: the row's (max, sum of exp, target logit) over
    them go to Part [3, splits, T] (float32), merged by _merge_splits_kernel."""
    stride_h, stride_w, h_cols, w_cols = _aligned((stride_h, stride_w, h_cols, w_cols), ALIGN)
    rows, row_mask, ignored, _group, idle = _compacted_rows(
        Order, Count, num_rows, num_rows, num_segments, blocks_per_segment, segment_rows, BLOCK_T
    )  # all rows form one group
    if not SPLIT:  # (split: the merge writes every row)
        tl.store(Loss + rows, 0.0, mask=ignored)
        tl.store(Lse + rows, 0.0, mask=ignored)
    if idle:
        return
    n_begin, n_end = _split_items(num_items, items_per_split, SPLIT)
    offs_d = tl.arange(0, BLOCK_D)
    h = tl.load(H + rows[:, None].to(tl.int64) * stride_h + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d[None, :] < h_cols), other=0.0)  # fmt: skip
    target = tl.load(Targets + rows, mask=row_mask, other=ignore_index)
    excluded_ids = _excluded_ids(Excluded, NUM_EXCLUDED)
    running_max = tl.full([BLOCK_T], -float("inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_T], tl.float32)
    target_logits = tl.zeros([BLOCK_T], tl.float32)
    for n_start in range(n_begin, n_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        kept = _kept_items(n_start, num_items, Excluded, excluded_ids, BLOCK_N, NUM_EXCLUDED, EXCLUDED_MASK)
        logits, _ = _item_logits(h, H, rows, row_mask, W, offs_n, kept, offs_d, stride_h, stride_w, num_items, h_cols,
                                 w_cols, inv_temp, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
        # The target's logit from the same tile product as the LSE, so that loss = lse - logit
        # is exactly 0 when the target is the only class.
        target_logits += tl.sum(tl.where(offs_n[None, :] == target[:, None], logits, 0.0), 1)
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        # -inf until a tile holds an item that is not excluded: exp(-inf - -inf) would be NaN.
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]), 1)
        running_max = new_max
    if SPLIT:
        part = Part + tl.program_id(1) * num_rows + rows  # [BT]: entries (0, split, row), (1, ...), (2, ...)
        split_stride = tl.num_programs(1) * num_rows
        tl.store(part, running_max, mask=row_mask)
        tl.store(part + split_stride, running_sum, mask=row_mask)
        tl.store(part + 2 * split_stride, target_logits, mask=row_mask)
        return
    lse = running_max + tl.log(running_sum)
    tl.store(Lse + rows, lse, mask=row_mask)
    # A target outside [0, N) (possible only where the host check was skipped) is an ignored row.
    valid = (target != ignore_index) & (target >= 0) & (target < num_items)
    tl.store(Loss + rows, tl.where(valid, lse - target_logits, 0.0), mask=row_mask)


@triton.jit
def _split_items(num_items, items_per_split, SPLIT: tl.constexpr):
    """[n_begin, n_end): the items of this program, all of them or, with SPLIT, those of split
    program_id(1) (items_per_split a multiple of BLOCK_N)."""
    if SPLIT:
        n_begin = tl.program_id(1) * items_per_split
        return n_begin, tl.minimum(n_begin + items_per_split, num_items)
    return 0, num_items


@triton.jit
def _merge_splits_kernel(Part, Targets, Loss, Lse, num_rows, num_items, splits, ignore_index, BLOCK_R: tl.constexpr):
    """Loss and LSE of BLOCK_R rows from the splits' partials Part [3, splits, T] (max, sum of
    exp, target logit; float32): the log-sum-exp of the partial sums, in split order, and the
    target's logit (0 in every split but its own). Ignored rows (no partials): 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    target = tl.load(Targets + rows, mask=rows < num_rows, other=ignore_index)
    valid = (rows < num_rows) & (target != ignore_index) & (target >= 0) & (target < num_items)
    split_stride = splits * num_rows
    row_max = tl.full([BLOCK_R], -float("inf"), tl.float32)
    for split in range(0, splits):
        row_max = tl.maximum(row_max, tl.load(Part + split * num_rows + rows, mask=valid, other=-float("inf")))
    safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)  # (never for a valid row: its target is kept)
    row_sum = tl.zeros([BLOCK_R], tl.float32)
    target_logit = tl.zeros([BLOCK_R], tl.float32)
    for split in range(0, splits):
        part = Part + split * num_rows + rows
        split_max = tl.load(part, mask=valid, other=-float("inf"))
        row_sum += tl.load(part + split_stride, mask=valid, other=0.0) * tl.exp(split_max - safe_max)
        target_logit += tl.load(part + 2 * split_stride, mask=valid, other=0.0)
    lse = safe_max + tl.log(tl.where(valid, row_sum, 1.0))
    tl.store(Lse + rows, tl.where(valid, lse, 0.0), mask=rows < num_rows)
    tl.store(Loss + rows, tl.where(valid, lse - target_logit, 0.0), mask=rows < num_rows)


@triton.jit
def _full_bwd_hidden_kernel(
    H, W, Targets, Excluded, Lse, GradLoss, DH, Order, Count, Part,
    stride_h, stride_w, stride_grad, stride_dh,
    num_rows, num_items, hidden_dim, h_cols, w_cols, inv_temp, ignore_index,
    num_segments, blocks_per_segment, segment_rows, items_per_split,
    NUM_EXCLUDED: tl.constexpr, EXCLUDED_MASK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """d hidden of a block of rows; with SPLIT (a tuning candidate), the part from split
    program_id(1)'s items (split 0 adds the target's term) to Part [splits, T, D] (float32),
    summed by _sum_splits_kernel."""
    stride_h, stride_w, stride_dh = _aligned((stride_h, stride_w, stride_dh), ALIGN)
    hidden_dim, h_cols, w_cols = _aligned((hidden_dim, h_cols, w_cols), ALIGN)
    rows, row_mask, ignored, _group, idle = _compacted_rows(
        Order, Count, num_rows, num_rows, num_segments, blocks_per_segment, segment_rows, BLOCK_T
    )  # all rows form one group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < hidden_dim
    if idle:  # only ignored rows: d hidden 0 (split: the sum writes it)
        if not SPLIT:
            tl.store(DH + rows[:, None].to(tl.int64) * stride_dh + offs_d[None, :], 0.0,
                     mask=ignored[:, None] & d_mask)  # fmt: skip
        return
    h, _, valid, w_target, _ = _positive_logits(
        H, W, Targets, Targets, rows, row_mask, offs_d, stride_h, stride_w, num_items, h_cols, w_cols, inv_temp,
        ignore_index, False,
    )  # fmt: skip
    lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
    row_scale = tl.where(valid, tl.load(GradLoss + rows * stride_grad, mask=row_mask, other=0.0) * inv_temp, 0.0)
    dh = -row_scale[:, None] * w_target  # the onehot(target) part of softmax - onehot
    if SPLIT:
        dh = tl.where(tl.program_id(1) == 0, dh, 0.0)  # (once, in split 0)
    n_begin, n_end = _split_items(num_items, items_per_split, SPLIT)
    excluded_ids = _excluded_ids(Excluded, NUM_EXCLUDED)
    for n_start in range(n_begin, n_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        kept = _kept_items(n_start, num_items, Excluded, excluded_ids, BLOCK_N, NUM_EXCLUDED, EXCLUDED_MASK)
        logits, w = _item_logits(h, H, rows, row_mask, W, offs_n, kept, offs_d, stride_h, stride_w, num_items, h_cols,
                                 w_cols, inv_temp, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
        coef = tl.exp(logits - lse[:, None]) * row_scale[:, None]  # [BT, BN]
        dh += tl.dot(coef.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    # The rows again, for the store: where D is not a multiple of 16 it takes a row index per
    # element, which kept live through the loop cost ~80 registers (D=50, sm_80).
    rows, row_mask, ignored, _group, _idle = _compacted_rows(
        Order, Count, num_rows, num_rows, num_segments, blocks_per_segment, segment_rows, BLOCK_T
    )
    if SPLIT:  # [splits, T, D], only the rows that count
        part_ptr = Part + (tl.program_id(1) * num_rows + rows[:, None]).to(tl.int64) * hidden_dim + offs_d[None, :]
        tl.store(part_ptr, dh, mask=row_mask[:, None] & d_mask)
        return
    dh_ptr = DH + rows[:, None].to(tl.int64) * stride_dh + offs_d[None, :]
    dh = tl.where(row_mask[:, None], dh, 0.0)  # 0 at this block's ignored rows
    tl.store(dh_ptr, dh.to(DH.dtype.element_ty), mask=(row_mask | ignored)[:, None] & d_mask)


@triton.jit
def _sum_splits_kernel(Part, Targets, DH, num_rows, num_items, hidden_dim, stride_dh, splits, ignore_index,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """d hidden of BLOCK_R rows: the sum, in split order, of the splits' partials Part
    [splits, T, D] (float32), written in DH's dtype; 0 at ignored rows (no partials)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    target = tl.load(Targets + rows, mask=rows < num_rows, other=ignore_index)
    valid = (rows < num_rows) & (target != ignore_index) & (target >= 0) & (target < num_items)
    d_mask = offs_d[None, :] < hidden_dim
    dh = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(0, splits):
        part_ptr = Part + (split * num_rows + rows[:, None]).to(tl.int64) * hidden_dim + offs_d[None, :]
        dh += tl.load(part_ptr, mask=valid[:, None] & d_mask, other=0.0)
    tl.store(DH + rows[:, None].to(tl.int64) * stride_dh + offs_d[None, :], dh.to(DH.dtype.element_ty),
             mask=(rows[:, None] < num_rows) & d_mask)  # fmt: skip


@triton.jit
def _full_bwd_weight_kernel(
    H, W, Targets, Excluded, Lse, GradLoss, DW, Order, Count, DHSum,
    stride_h, stride_w, stride_grad, stride_dw,
    num_rows, num_items, hidden_dim, h_cols, w_cols, inv_temp, ignore_index,
    num_segments, segment_rows,
    NUM_EXCLUDED: tl.constexpr, EXCLUDED_MASK: tl.constexpr, FUSED: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_CHUNK: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """d weight for a block of items, streaming the blocks of compacted rows that count, segment
    by segment: no atomics. Every item row is written. With FUSED (a tuning candidate), d
    hidden from the same logit tiles too: each tile's [BT, D] part added to DHSum [T, D]
    (float32, zeroed) by relaxed atomics, so that no second kernel recomputes the logits."""
    stride_h, stride_w, stride_dw = _aligned((stride_h, stride_w, stride_dw), ALIGN)
    hidden_dim, h_cols, w_cols = _aligned((hidden_dim, h_cols, w_cols), ALIGN)
    n_start = tl.program_id(0) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    excluded_ids = _excluded_ids(Excluded, NUM_EXCLUDED)
    kept = _kept_items(n_start, num_items, Excluded, excluded_ids, BLOCK_N, NUM_EXCLUDED, EXCLUDED_MASK)
    offs_d = tl.arange(0, BLOCK_D)
    dw = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for segment in range(0, num_segments):
        count = tl.load(Count + segment)
        for t_start in range(0, count, BLOCK_T):
            slots = t_start + tl.arange(0, BLOCK_T)
            row_mask = slots < count
            rows = tl.load(Order + segment * segment_rows + slots, mask=row_mask, other=0)
            h = tl.load(H + rows[:, None].to(tl.int64) * stride_h + offs_d[None, :],
                        mask=row_mask[:, None] & (offs_d[None, :] < h_cols), other=0.0)  # fmt: skip
            target = tl.load(Targets + rows, mask=row_mask, other=ignore_index)
            valid = row_mask & (target != ignore_index) & (target >= 0) & (target < num_items)
            lse = tl.load(Lse + rows, mask=row_mask, other=0.0)
            grad = tl.load(GradLoss + rows * stride_grad, mask=row_mask, other=0.0)
            row_scale = tl.where(valid, grad * inv_temp, 0.0)
            logits, w = _item_logits(h, H, rows, row_mask, W, offs_n, kept, offs_d, stride_h, stride_w, num_items,
                                     h_cols, w_cols, inv_temp, DOT_CHUNK, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
            is_target = target[:, None] == offs_n[None, :]
            coef = (tl.exp(logits - lse[:, None]) - is_target.to(tl.float32)) * row_scale[:, None]  # [BT, BN]
            dw += tl.dot(tl.trans(coef).to(DOT_DTYPE), h.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            if FUSED:
                dh = tl.dot(coef.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # [BT, BD]
                dh_mask = row_mask[:, None] & (offs_d[None, :] < hidden_dim)
                tl.atomic_add(DHSum + rows[:, None].to(tl.int64) * hidden_dim + offs_d[None, :], dh, mask=dh_mask,
                              sem="relaxed")  # fmt: skip
    dw_mask = (offs_n[:, None] < num_items) & (offs_d[None, :] < hidden_dim)
    tl.store(DW + offs_n[:, None].to(tl.int64) * stride_dw + offs_d[None, :], dw.to(DW.dtype.element_ty), mask=dw_mask)


def full_forward(hidden, weight, targets, excluded_ids, temperature, ignore_index):
    check_kernel_hidden_dim("triton", hidden.shape[1])
    hidden, weight = _contiguous_rows(hidden, weight)
    targets = targets.contiguous()
    num_rows = hidden.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)  # every row written (0 where ignored)
    lse = torch.empty_like(loss)
    if num_rows == 0:
        return loss, lse
    block_t, block_n, block_d, launch, variant = _blocks(
        hidden.shape[1], hidden.dtype, "full_softmax_fwd", hidden.device, weight.shape[0]
    )
    segments = _row_segments(num_rows, block_t)  # one group: every row against every item
    order, count = _compact(targets, weight.shape[0], ignore_index, segments)
    _, num_segments, blocks_per_segment, segment_rows = segments
    row_blocks = num_segments * blocks_per_segment
    splits, items_per_split = _item_splits(variant["ITEM_SPLITS"], row_blocks, weight.shape[0], block_n)
    part = torch.empty(3, splits, num_rows, dtype=torch.float32, device=hidden.device) if splits > 1 else loss
    (weight,) = _pad_columns((weight, row_blocks > 1))  # streamed by every row block
    excluded, exclusion = _exclusion(excluded_ids, weight.shape[0])
    launch_kernel(_full_fwd_kernel, (row_blocks, splits),
        hidden, weight, targets, excluded, loss, lse, order, count, part, hidden.stride(0), weight.stride(0),
        num_rows, weight.shape[0], hidden.shape[1], weight.shape[1], 1.0 / temperature, ignore_index,
        num_segments, blocks_per_segment, segment_rows, items_per_split, **exclusion, SPLIT=splits > 1,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, DOT_CHUNK=_dot_chunk(hidden.dtype, block_d),
        **_dot_options(hidden.dtype, hidden.shape[1]), ALIGN=_alignment(hidden.shape[1], hidden, weight), **launch,
    )  # fmt: skip
    if splits > 1:
        launch_kernel(_merge_splits_kernel, (cdiv(num_rows, MERGE_ROWS),),
            part, targets, loss, lse, num_rows, weight.shape[0], splits, ignore_index, BLOCK_R=MERGE_ROWS, num_warps=4,
        )  # fmt: skip
    return loss, lse


MERGE_ROWS = 256  # rows per program of the split forward's merge


def full_backward(grad_loss, hidden, weight, targets, excluded_ids, lse, temperature, ignore_index):
    check_kernel_hidden_dim("triton", hidden.shape[1])
    hidden, weight = _contiguous_rows(hidden, weight)
    targets = targets.contiguous()
    num_rows, num_items = hidden.shape[0], weight.shape[0]
    if num_rows == 0:
        return torch.empty_like(hidden), torch.zeros_like(weight)
    d_hidden, d_weight = torch.empty_like(hidden), torch.empty_like(weight)  # the kernels write every row
    block_t, block_n, block_d, launch, variant = _blocks(
        hidden.shape[1], hidden.dtype, "full_softmax_bwd", hidden.device, num_items
    )
    segments = _row_segments(num_rows, block_t)
    order, count = _compact(targets, num_items, ignore_index, segments)
    _, num_segments, blocks_per_segment, segment_rows = segments
    row_blocks, item_blocks = num_segments * blocks_per_segment, cdiv(num_items, block_n)
    hidden_dim = hidden.shape[1]
    fused = variant["FUSED"] and not torch.are_deterministic_algorithms_enabled()  # (the atomics' order varies)
    splits, items_per_split = (1, num_items) if fused else _item_splits(variant["ITEM_SPLITS"], row_blocks, num_items,
                                                                         block_n)  # fmt: skip
    # fused: d hidden's float32 sums (atomics); split: d hidden's partials [splits, T, D]
    part = torch.zeros(num_rows, hidden_dim, dtype=torch.float32, device=hidden.device) if fused else (
        torch.empty(splits, num_rows, hidden_dim, dtype=torch.float32, device=hidden.device) if splits > 1 else d_hidden
    )  # fmt: skip
    # hidden: streamed by every item block (d weight); the table by every row block (both)
    hidden, weight = _pad_columns((hidden, item_blocks > 1), (weight, row_blocks > 1))
    excluded, exclusion = _exclusion(excluded_ids, num_items)
    scalars = (num_rows, num_items, hidden_dim, hidden.shape[1], weight.shape[1], 1.0 / temperature, ignore_index)
    meta = dict(
        **exclusion, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, DOT_CHUNK=_dot_chunk(hidden.dtype, block_d),
        **_dot_options(hidden.dtype, hidden_dim), ALIGN=_alignment(hidden_dim, hidden, weight, d_hidden), **launch,
    )  # fmt: skip
    if not fused:
        launch_kernel(_full_bwd_hidden_kernel, (row_blocks, splits),
            hidden, weight, targets, excluded, lse, grad_loss, d_hidden, order, count, part,
            hidden.stride(0), weight.stride(0), grad_loss.stride(0), d_hidden.stride(0), *scalars,
            num_segments, blocks_per_segment, segment_rows, items_per_split, SPLIT=splits > 1, **meta,
        )  # fmt: skip
    if splits > 1:
        block_r = max(1, 4096 // block_d)  # a [BR, BD] float32 tile
        launch_kernel(_sum_splits_kernel, (cdiv(num_rows, block_r),),
            part, targets, d_hidden, num_rows, num_items, hidden_dim, d_hidden.stride(0), splits, ignore_index,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    launch_kernel(_full_bwd_weight_kernel, (item_blocks,),
        hidden, weight, targets, excluded, lse, grad_loss, d_weight, order, count, part,
        hidden.stride(0), weight.stride(0), grad_loss.stride(0), d_weight.stride(0), *scalars,
        num_segments, segment_rows, FUSED=fused, **meta,
    )  # fmt: skip
    return (part.to(d_hidden.dtype) if fused else d_hidden), d_weight
