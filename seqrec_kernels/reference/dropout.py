"""The attention-dropout keep mask as a counter-based hash, shared bit for bit with Triton.

Each (sequence, head, query position, key position) gets a 32-bit hash of the seed; the
probability is kept iff the hash's top 24 bits are >= `keep_threshold(p)`. Because the
mask is a pure function of the seed and the positions, forward and backward recompute it
instead of storing it, the seed can stay on the device (no host sync), and the reference
reproduces exactly the mask a kernel used. `seqrec_kernels/triton/dropout.py` holds the
same function in Triton; change both or neither.

Positions are local to their sequence, so a history gets the same mask whether it is
left-padded, right-padded or packed.
"""

import torch

MASK32 = 0xFFFFFFFF
MIX_MULT_1 = 0x7FEB352D  # multipliers of the "lowbias32" integer finalizer
MIX_MULT_2 = 0x846CA68B
ROW_SALT = 0x9E3779B9
COL_MULT = 0x85EBCA6B


def keep_threshold(dropout_p: float) -> int:
    """Keep iff (hash >> 8) >= this: P(keep) = 1 - threshold / 2**24."""
    return int(dropout_p * (1 << 24))


def _mulmod32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mulmod32(x, MIX_MULT_1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, MIX_MULT_2)
    return x ^ (x >> 16)


def row_hash(seed: torch.Tensor, row_key: torch.Tensor) -> torch.Tensor:
    """Per-query-row hash; row_key = (sequence * num_heads + head) * max_seqlen + position."""
    seed32 = seed.to(torch.int64) & MASK32
    return _mix32(_mix32((row_key.to(torch.int64) + ROW_SALT) & MASK32) ^ seed32)


def keep_mask(row_hashes: torch.Tensor, key_pos: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Boolean keep mask; broadcasts row_hashes [..., Lq, 1] against key positions [..., 1, Lk]."""
    col = _mulmod32(key_pos.to(torch.int64) & MASK32, COL_MULT)
    h = _mix32((row_hashes + col) & MASK32)
    return (h >> 8) >= keep_threshold(dropout_p)
