"""fused_attention / fused_attention_varlen: validation, dispatch and the torch ops.

Every backend implements one op pair with the same schema, `seqrec::attention_fwd_<backend>`
and `seqrec::attention_bwd_<backend>`, over a [B, H, L, D] view and per-sequence
(start, length) rows, which covers both the padded and the packed form (see
`seqrec_kernels/reference/attention.py` for the exact contract). `_library.define_ops`
defines them with their fake impls and autograd, so opcheck and
torch.compile(fullgraph=True) work.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_bool,
    check_choice,
    check_real,
    check_same,
    check_tensor,
    check_values,
    defer_error,
    value_check_mode,
    values_outside,
)
from .._limits import check_head_dim
from ..backends import Backend, resolve_for
from . import _front
from ._library import define_ops, empty_stats, extension_operands

_SCHEMAS = (
    "(Tensor q, Tensor k, Tensor v, Tensor seq_start, Tensor seq_len, int max_seqlen, bool causal,"
    " float scale, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor seq_start,"
    " Tensor seq_len, int max_seqlen, bool causal, float scale, float dropout_p,"
    " Tensor? dropout_seed) -> (Tensor, Tensor, Tensor)",
)


def _fake_forward(q, *_):
    return torch.empty_like(q), empty_stats(q, q.shape[:3])


_FORWARD_OPS = define_ops(
    "attention", _SCHEMAS, implementations=("attention", "attention"), outputs=("out", "lse"), fake=_fake_forward
)


def _check_qkv(q, k, v, layout: str) -> None:
    check_tensor("q", q, ndim=len(layout.split(",")), layout=layout, dtypes=FLOAT_DTYPES)
    check_tensor("k", k)
    check_tensor("v", v)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    check_head_dim(q.shape[-1], layout)


def _check_options(causal, dropout_p, scale, head_dim) -> tuple[float, float]:
    check_bool("causal", causal)
    dropout_p = check_real("dropout_p", dropout_p, low=0.0, high=1.0)
    if scale is None:
        return dropout_p, 1.0 / math.sqrt(head_dim)
    return dropout_p, check_real("scale", scale, low=-math.inf, high=math.inf)


def _seq_lens_expected(length) -> str:
    return f"values in [0, {length}] (L)"


def _offsets_outside(total, max_seqlen) -> str:
    """The message of a deferred cu_seqlens check."""
    return (
        f"cu_seqlens: expected non-decreasing offsets from 0 to at most T={total},"
        f" sequences at most max_seqlen={max_seqlen} long"
    )


def _check_offsets(cu_seqlens, seq_len, total, max_seqlen) -> None:
    """cu_seqlens non-decreasing from 0 to at most T, no sequence longer than max_seqlen
    (value_checks says when and where; seq_len = cu_seqlens.diff())."""
    mode = value_check_mode(cu_seqlens)
    if mode == "deferred":
        bad = seq_len.clamp(0, max_seqlen).ne(seq_len).any() | cu_seqlens[0].ne(0) | cu_seqlens[-1].gt(total)
        defer_error("cu_seqlens", bad, _offsets_outside(total, max_seqlen))
    if mode != "now":
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] > total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to at most T={total} (rows past the last"
            f" offset are padding), got {offsets}"
        )
    longest = max(b - a for a, b in zip(offsets, offsets[1:]))
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen: expected >= the longest sequence ({longest}), got {max_seqlen}")


def _attention(q, k, v, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, backend, op_name):
    """Resolves the backend and runs its op on the [B, H, L, D] views."""
    chosen = resolve_for(backend, op_name, "q", q)
    # Kernels need unit stride along the head dim; anything else is copied once here.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    # Every backend gets contiguous index tensors: the C++ ops read them through raw pointers.
    seq_start, seq_len = seq_start.contiguous(), seq_len.contiguous()
    # The seed is drawn on the device from torch's generator: no host sync, and
    # torch.manual_seed makes the mask reproducible. p == 0 takes no RNG.
    seed = torch.randint(2**31 - 1, (1,), device=q.device) if dropout_p > 0.0 else None
    operands = extension_operands(chosen, q, k, v)
    out, lse = _FORWARD_OPS[chosen](*operands, seq_start, seq_len, max_seqlen, causal, scale, dropout_p, seed)
    return (out if operands[0] is q else out.to(q.dtype)), lse  # bfloat16 copies: back to float32


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    seq_lens: torch.Tensor | None = None,
    padding_side: Literal["left", "right"] = "left",
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | Backend = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention over padded histories, q/k/v [B, H, L, D] -> out [B, H, L, D].

    Query i sees key j iff both are real tokens and (not causal or j <= i). Row b holds
    seq_lens[b] real tokens: the last ones (padding_side="left", as SASRec pads) or the
    first ones ("right"); None means all L. Padding rows output zeros and get zero
    gradients. With return_lse, also returns the row log-sum-exp [B, H, L] (float32,
    -inf at padding rows, not differentiable). Any strides with unit stride on D work,
    so `x.view(B, L, H, D).transpose(1, 2)` needs no copy; out has the layout of q.
    """
    checks = _front.front_checks(backend, "fused_attention", q, k, v, seq_lens)
    if (
        checks is not None
        and type(causal) is bool
        and type(dropout_p) in _front.REAL
        and (scale is None or type(scale) in _front.REAL)
        and (padding_side == "left" or padding_side == "right")
        and type(return_lse) is bool
    ):
        out, lse, flag = _front.FUSED_ATTENTION(
            q, k, v, seq_lens, causal, padding_side == "left", dropout_p, scale, return_lse, *checks
        )
        if out is not None:  # else declined: the general path below names what is wrong
            if flag is not None:
                defer_error("seq_lens", flag, values_outside("seq_lens", _seq_lens_expected(q.shape[2])))
            return (out, lse) if return_lse else out
    _check_qkv(q, k, v, "[B, H, L, D]")
    batch, _, length, head_dim = q.shape
    dropout_p, scale = _check_options(causal, dropout_p, scale, head_dim)
    check_choice("padding_side", padding_side, ("left", "right"))
    check_bool("return_lse", return_lse)
    if seq_lens is None:
        seq_len = torch.full((batch,), length, dtype=torch.int32, device=q.device)
    else:
        check_tensor("seq_lens", seq_lens, ndim=1, layout="[B]", dtypes=INDEX_DTYPES, device=q.device)
        if seq_lens.shape[0] != batch:
            raise ValueError(
                f"seq_lens: expected shape ({batch},) (one length per batch row of q), got {tuple(seq_lens.shape)}"
            )
        check_values("seq_lens", seq_lens, 0, length, _seq_lens_expected(length), show_all=True)
        seq_len = seq_lens.to(torch.int32)
    # torch.rsub, not `length - seq_len`: Tensor.__rsub__'s Python wrapper costs as much as the op.
    seq_start = torch.rsub(seq_len, length) if padding_side == "left" else torch.zeros_like(seq_len)

    out, lse = _attention(q, k, v, seq_start, seq_len, length, causal, scale, dropout_p, backend, "fused_attention")
    return (out, lse) if return_lse else out


def fused_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | Backend = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed histories: q/k/v [T, H, D] hold the sequences end to end;
    sequence b is rows cu_seqlens[b] .. cu_seqlens[b+1] - 1, and max_seqlen bounds their
    lengths. Returns out [T, H, D] (and, with return_lse, the LSE [H, T] float32).

    cu_seqlens[-1] may be less than T: rows cu_seqlens[-1] .. T - 1 belong to no sequence,
    output zeros, get zero gradients and have LSE -inf; no backend visits them beyond
    zero-filling its outputs. So T can be rounded up to a few fixed sizes (static shapes for
    torch.compile and CUDA graphs) with a padding tail that costs no attention work."""
    checks = _front.front_checks(backend, "fused_attention_varlen", q, k, v, cu_seqlens)
    if (
        checks is not None
        and type(max_seqlen) is int
        and type(causal) is bool
        and type(dropout_p) in _front.REAL
        and (scale is None or type(scale) in _front.REAL)
        and type(return_lse) is bool
    ):
        out, lse, flag = _front.FUSED_ATTENTION_VARLEN(
            q, k, v, cu_seqlens, max_seqlen, causal, dropout_p, scale, return_lse, *checks
        )
        if out is not None:  # else declined: the general path below names what is wrong
            if flag is not None:
                defer_error("cu_seqlens", flag, _offsets_outside(q.shape[0], max_seqlen))
            return (out, lse) if return_lse else out
    _check_qkv(q, k, v, "[T, H, D]")
    total, _, head_dim = q.shape
    dropout_p, scale = _check_options(causal, dropout_p, scale, head_dim)
    check_bool("return_lse", return_lse)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, layout="[B + 1]", dtypes=INDEX_DTYPES, device=q.device)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens: expected at least 2 offsets ([B + 1] with B >= 1), got shape {tuple(cu_seqlens.shape)}"
        )
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected an int >= 0, got {max_seqlen!r}")
    seq_start, seq_len = cu_seqlens[:-1].to(torch.int32), cu_seqlens.diff().to(torch.int32)
    _check_offsets(cu_seqlens, seq_len, total, max_seqlen)

    def as_batch_view(t):  # [T, H, D] -> [1, H, T, D], no copy
        return t.unsqueeze(0).transpose(1, 2)

    out, lse = _attention(
        as_batch_view(q), as_batch_view(k), as_batch_view(v), seq_start, seq_len, max_seqlen,
        causal, scale, dropout_p, backend, "fused_attention_varlen",
    )  # fmt: skip
    out = out.squeeze(0).transpose(0, 1)  # [T, H, D]
    return (out, lse[0]) if return_lse else out
