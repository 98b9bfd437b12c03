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

from benchmarks import attention as attention_benchmark
from benchmarks import common
from benchmarks import retrieval as retrieval_benchmark
from benchmarks import softmax_loss as loss_benchmark
from seqrec_kernels import available, full_softmax_loss, fused_attention, sampled_softmax_loss, target_ranks, topk_items

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = ["reference", "triton", "cuda", "cpp"]
# The benchmarks' own shape tables: their quick shapes for this device.
_GPU = DEVICE.type == "cuda"
_QUICK_ATTENTION = {name for name, _ in attention_benchmark.QUICK_CONFIGS}
_GPU_ATTENTION = [s for s in attention_benchmark.SHAPES if s.name in _QUICK_ATTENTION]
ATTENTION_SHAPES = {s.name: s for s in (_GPU_ATTENTION if _GPU else attention_benchmark.CPU_QUICK_SHAPES)}
LOSS_SHAPES = {s.name: s for s in (loss_benchmark.QUICK_SHAPES if _GPU else loss_benchmark.CPU_QUICK_SHAPES)}
_RETRIEVAL = retrieval_benchmark.QUICK_SHAPES if _GPU else retrieval_benchmark.CPU_QUICK_SHAPES
RETRIEVAL_SHAPES = {s.name: s for s in _RETRIEVAL}


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
    shape = ATTENTION_SHAPES[shape]
    batch, length, heads, head_dim = shape.batch, shape.length, shape.heads, shape.head_dim
    seq_lens, _ = common.sample_lengths(shape.dataset, batch, length, torch.Generator().manual_seed(0))
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
    timed(benchmark, step, f"attention {shape.name} {DTYPE} forward+backward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(LOSS_SHAPES))
def test_softmax_loss(benchmark, shape, backend):
    usable(backend)
    shape = LOSS_SHAPES[shape]
    loss, tokens, hidden_dim, num_items = shape.loss, shape.tokens, shape.hidden, shape.num_items
    num_neg = shape.num_neg
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
    timed(benchmark, step, f"softmax_loss {shape.name} {DTYPE} forward+backward")


@pytest.mark.parametrize("backend", ["reference", "triton"])  # the extension has no retrieval kernels
@pytest.mark.parametrize("shape", list(RETRIEVAL_SHAPES))
def test_retrieval(benchmark, shape, backend):
    usable(backend)
    shape = RETRIEVAL_SHAPES[shape]
    torch.manual_seed(0)
    hidden, weight, exclude, targets = retrieval_benchmark.input_sets(shape, DTYPE, 1, DEVICE)[0]

    def step(backend=backend):  # the top-k scores [B, k] (ids may differ between near-equal scores), or the ranks
        if shape.op == "topk":
            return topk_items(hidden, weight, shape.k, exclude=exclude, backend=backend)[0]
        return target_ranks(hidden, weight, targets, exclude=exclude, backend=backend).float()

    if backend != "reference":
        error = common.max_rel_error([step()], [step("reference")])
        assert error <= common.TOLERANCE[DTYPE], f"{backend}: relative error {error:.2e} vs the reference"
    timed(benchmark, step, f"retrieval {shape.name} {DTYPE} forward")
