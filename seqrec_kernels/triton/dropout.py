"""The attention-dropout hash of `seqrec_kernels/reference/dropout.py`, in Triton (uint32 math)."""

import triton
import triton.language as tl

from ..reference import dropout as ref

MIX_MULT_1: tl.constexpr = tl.constexpr(ref.MIX_MULT_1)
MIX_MULT_2: tl.constexpr = tl.constexpr(ref.MIX_MULT_2)
ROW_SALT: tl.constexpr = tl.constexpr(ref.ROW_SALT)
COL_MULT: tl.constexpr = tl.constexpr(ref.COL_MULT)


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x = x * tl.full([], MIX_MULT_1, tl.uint32)
    x ^= x >> 15
    x = x * tl.full([], MIX_MULT_2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def row_hash(seed, row_key):
    """seed: uint32 scalar; row_key: uint32 [M] = (sequence * H + head) * max_seqlen + position."""
    return _mix32(_mix32(row_key + tl.full([], ROW_SALT, tl.uint32)) ^ seed)


@triton.jit
def keep_mask(row_hashes, key_pos, threshold):
    """[M, N] bool from row hashes [M] (uint32) and key positions [N] (int32)."""
    col = key_pos.to(tl.uint32) * tl.full([], COL_MULT, tl.uint32)
    h = _mix32(row_hashes[:, None] + col[None, :])
    return (h >> 8) >= threshold
