"""pytest-benchmark: each backend against the reference at a few shapes, on the device present.

    pytest benchmarks/ --benchmark-only                       # GPU if there is one, else CPU
    pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr,rounds

Each benchmark first checks the backend's outputs against the reference's (a wrong
backend fails), then times forward+backward (synchronized). pytest-benchmark groups the
backends of one shape, so its table shows how they compare. `make test` does not collect
these (its testpaths are tests/). The full benchmarks are `python -m benchmarks ...`.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import common
from seqrec_kernels import available, full_softmax_loss, fused_attention, sampled_softmax_loss

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = ["reference", "triton", "cuda"]
ATTENTION_SHAPES = {  # name: (B, L, H, D, lengths from)
    "cuda": {"SASRec-Games": (128, 50, 1, 50, "games"), "SASRec-ML-1M": (128, 200, 1, 50, "ml-1m"),
             "long-1024": (32, 1024, 4, 64, None)},
    "cpu": {"SASRec-Games-small": (16, 50, 1, 50, "games"), "ML-1M-small": (8, 200, 1, 50, "ml-1m")},
}[DEVICE.type]  # fmt: skip
LOSS_SHAPES = {  # name: (loss, T, D, K, N)
    "cuda": {"sampled-T25600-K1024": ("sampled", 25_600, 64, 1024, 23_715),
             "sampled-T65536-K8192": ("sampled", 65_536, 64, 8192, 1_000_000),
             "full-T6400-N23715": ("full", 6400, 64, None, 23_715)},
    "cpu": {"sampled-T512-K128": ("sampled", 512, 50, 128, 23_715), "full-T128-N5000": ("full", 128, 50, None, 5000)},
}[DEVICE.type]  # fmt: skip


def usable(backend: str) -> None:
    """Skips backends that cannot run here, or that are not timed here (Triton on a CPU
    would run in its interpreter)."""
    if backend == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton kernels are timed on a GPU only")
    if backend not in {b.value for b in available(DEVICE)}:
        pytest.skip(f"backend {backend!r} is not available on {DEVICE.type} (see `seqrec info`)")


def timed(benchmark, step, group: str) -> None:
    """pytest-benchmark timing of step(), synchronized on a GPU so the wall clock covers the kernels."""
    benchmark.group = group

    def call():
        step()
        common.synchronize(DEVICE)

    call()  # compile / autotune outside the timing
    benchmark.pedantic(call, rounds=20 if DEVICE.type == "cuda" else 5, warmup_rounds=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES))
def test_attention(benchmark, shape, backend):
    usable(backend)
    batch, length, heads, head_dim, dataset = ATTENTION_SHAPES[shape]
    seq_lens, _ = common.sample_lengths(dataset, batch, length, torch.Generator().manual_seed(0))
    seq_lens = seq_lens.to(DEVICE)
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, length, head_dim, device=DEVICE, dtype=DTYPE).requires_grad_() for _ in range(3)
    )
    dout = torch.randn_like(q)

    def step(backend=backend):  # [B, H, L, D] out and the three gradients
        out = fused_attention(q, k, v, seq_lens=seq_lens, backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    if backend != "reference":
        error = common.max_rel_error(step(), step("reference"))
        assert error <= common.TOLERANCE[DTYPE], f"{backend}: relative error {error:.2e} vs the reference"
    timed(benchmark, step, f"attention {shape} {DTYPE} forward+backward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(LOSS_SHAPES))
def test_softmax_loss(benchmark, shape, backend):
    usable(backend)
    loss, tokens, hidden_dim, num_neg, num_items = LOSS_SHAPES[shape]
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_dim, device=DEVICE, dtype=DTYPE).requires_grad_()
    weight = (torch.randn(num_items, hidden_dim, device=DEVICE) * 0.05).to(DTYPE).requires_grad_()
    targets = torch.randint(1, num_items, (tokens,), device=DEVICE)
    negatives = torch.randint(1, num_items, (num_neg or 1,), device=DEVICE)

    def step(backend=backend):  # loss, d hidden [T, D], d weight [N, D]
        if loss == "sampled":
            value = sampled_softmax_loss(hidden, weight, targets, negatives, backend=backend)
        else:
            value = full_softmax_loss(hidden, weight, targets, backend=backend)
        return (value, *torch.autograd.grad(value, (hidden, weight)))

    if backend != "reference":
        try:
            truth = step("reference")
        except torch.cuda.OutOfMemoryError:
            truth = None  # the case the kernels exist for: nothing to compare with
        if truth is not None:
            error = common.max_rel_error(step(), truth)
            assert error <= common.TOLERANCE[DTYPE], f"{backend}: relative error {error:.2e} vs the reference"
        del truth
    timed(benchmark, step, f"softmax_loss {shape} {DTYPE} forward+backward")
