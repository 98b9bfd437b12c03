"""Inputs the kernels cannot take as they come: strided index tensors (the C++ ops read
them through raw pointers) and loss hidden sizes above the kernels' limit. The public API
hands every backend contiguous index tensors and rejects D > 1024 for the kernel backends
before any kernel runs; direct calls of the C++ ops get the same errors from csrc/checks.h
(their own cases are in test_extension.py)."""

import re

import pytest
import torch

from backends_under_test import KERNELS
from seqrec_kernels import full_softmax_loss, fused_attention, fused_attention_varlen, sampled_softmax_loss
from seqrec_kernels._limits import MAX_KERNEL_HIDDEN_DIM
from seqrec_kernels.ops import softmax_loss as loss_ops


def strided(values, dtype):
    """A non-contiguous 1-D view of `values`: column 0 of a [len, 2] tensor."""
    return torch.stack([torch.tensor(values), torch.full((len(values),), 99)], dim=1).to(dtype)[:, 0]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_strided_seq_lens(backend, dtype):
    q, k, v = (torch.randn(3, 2, 8, 16) for _ in range(3))
    seq_lens = strided([8, 3, 0], dtype)
    assert not seq_lens.is_contiguous()
    out = fused_attention(q, k, v, seq_lens=seq_lens, backend=backend)
    expected = fused_attention(q, k, v, seq_lens=seq_lens.contiguous(), backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_strided_cu_seqlens(backend, dtype):
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    cu_seqlens = strided([0, 4, 4, 9], dtype)
    assert not cu_seqlens.is_contiguous()
    out = fused_attention_varlen(q, k, v, cu_seqlens, 5, backend=backend)
    expected = fused_attention_varlen(q, k, v, cu_seqlens.contiguous(), 5, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS)
def test_strided_item_ids(backend):
    hidden, weight = torch.randn(6, 16), torch.randn(20, 16)
    pos = strided([3, 0, 7, 19, 1, 5], torch.int32)
    neg = strided([2, 9, 0, 4], torch.int64)
    for loss in (
        lambda ids, b: sampled_softmax_loss(hidden, weight, ids, neg, reduction="none", backend=b),
        lambda ids, b: sampled_softmax_loss(hidden, weight, ids, neg.contiguous(), reduction="none", backend=b),
        lambda ids, b: full_softmax_loss(hidden, weight, ids, reduction="none", backend=b),
    ):
        torch.testing.assert_close(loss(pos, backend), loss(pos.contiguous(), "reference"), rtol=1e-4, atol=1e-5)


def _fail_if_run(*args):
    raise AssertionError("a kernel ran")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_hidden_above_the_kernel_limit(monkeypatch, backend, loss):
    dim = MAX_KERNEL_HIDDEN_DIM + 1
    hidden, weight, ids = torch.randn(2, dim), torch.randn(5, dim), torch.tensor([1, 2])
    for ops in (loss_ops._SAMPLED_OPS, loss_ops._FULL_OPS):
        monkeypatch.setitem(ops, loss_ops.Backend(backend), _fail_if_run)
    message = re.escape("hidden: expected D <= 1024 (the kernel backends' limit; ") + r".*got D=1025"
    with pytest.raises(ValueError, match=message):
        if loss == "sampled":
            sampled_softmax_loss(hidden, weight, ids, ids, backend=backend)
        else:
            full_softmax_loss(hidden, weight, ids, backend=backend)


def test_reference_has_no_hidden_limit():
    dim = MAX_KERNEL_HIDDEN_DIM + 1
    hidden, weight, ids = torch.randn(2, dim), torch.randn(5, dim), torch.tensor([1, 2])
    assert sampled_softmax_loss(hidden, weight, ids, ids, backend="reference").isfinite()
    assert full_softmax_loss(hidden, weight, ids, backend="reference").isfinite()


@pytest.mark.parametrize("op", ["sampled_softmax_fwd_triton", "full_softmax_fwd_triton"])
def test_direct_triton_op_rejects_wide_hidden(op):
    dim = MAX_KERNEL_HIDDEN_DIM + 1
    hidden, weight, ids = torch.randn(2, dim), torch.randn(5, dim), torch.tensor([1, 2])
    rest = (ids, ids[None], None, None, 2, True, 1.0, 0) if op.startswith("sampled") else (
        ids, torch.tensor([0], dtype=torch.int32), 1.0, 0)  # fmt: skip
    with pytest.raises(ValueError, match="hidden: .*1024"):
        getattr(torch.ops.seqrec, op)(hidden, weight, *rest)
