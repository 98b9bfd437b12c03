"""GPU: what a CPU run cannot show (issue 28). Every output element written over memory
poisoned with NaN (an unwritten row fails where fresh memory would happen to be zero), the
CUDA launches of a call counted by torch.profiler (no fill launches), the deterministic item
gradients bit-for-bit repeatable on hardware, and the shapes the CPU fuzz cannot afford:
attention head dims up to 256, loss hidden dims up to 1024, more than 8 excluded items,
huge logits."""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_helpers import check_against_truth, make_qkv
from backends_under_test import GPU_CUDA
from loss_helpers import check_loss_against_truth, full_pair, sampled_pair
from seqrec_kernels import full_softmax_loss, fused_attention, sampled_softmax_loss, value_checks
from seqrec_kernels.backends import extension_has_cuda_kernels

pytestmark = pytest.mark.gpu
GPU_KERNELS = ["triton", GPU_CUDA]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@contextlib.contextmanager
def poisoned_allocations():
    """Fresh allocations (torch.empty and friends, in Python or C++) filled with NaN (integers:
    their largest value), as torch does in deterministic mode with fill_uninitialized_memory."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_poisoned_allocations_poison():
    """The control: without a kernel writing it, a fresh output is NaN."""
    with poisoned_allocations():
        assert torch.empty(5, device="cuda").isnan().all()
        assert torch.empty_like(torch.ones(3, device="cuda", dtype=torch.bfloat16)).isnan().all()


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("form", ["left", "right", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [50, 64, 128, 256])
def test_gpu_attention_writes_every_row_over_poisoned_memory(backend, form, dtype, head_dim):
    """Padding rows (and the packed tail past cu_seqlens[-1]) must be written as zeros, real
    rows by the rule; head dims up to 256 on hardware."""
    q, k, v = (t.detach().cuda() for t in make_qkv(3, 2, 150, head_dim, dtype))
    seq_lens = torch.tensor([150, 37, 0], device="cuda")
    padding_side = "right" if form == "right" else "left"
    with poisoned_allocations():
        check_against_truth(q, k, v, seq_lens, padding_side, True, backend, dropout_p=0.2, varlen=form == "packed",
                            tail=7 * (form == "packed"))  # fmt: skip


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_dim", [50, 300, 1024])
def test_gpu_losses_write_every_row_over_poisoned_memory(backend, dtype, hidden_dim):
    """Ignored rows must get loss 0 and zero d hidden; hidden dims up to 1024; more than 8
    excluded items (Triton's int8 catalog mask)."""
    rows, num_items = 300, 5000
    hidden = torch.randn(rows, hidden_dim, device="cuda").to(dtype)
    weight = (torch.randn(num_items, hidden_dim, device="cuda") * 0.5).to(dtype)
    targets = torch.randint(100, num_items, (rows,), device="cuda")
    targets[::3] = 0  # ignored rows
    negatives = torch.randint(1, num_items, (rows, 64), device="cuda")
    with poisoned_allocations():
        check_loss_against_truth(*sampled_pair(backend, targets, negatives), hidden, weight)
        check_loss_against_truth(*full_pair(backend, targets, excluded=tuple(range(40))), hidden, weight)


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("dtype, scale", [(dtype, 1.0) for dtype in DTYPES] + [(torch.float32, 30.0)])
def test_gpu_sharply_peaked_and_huge_logits(backend, dtype, scale):
    """tests/test_softmax_loss.py's peaked and huge-logit case on hardware."""
    rows, dim, n = 200, 64, 700
    hidden, weight = torch.randn(rows, dim), torch.randn(n, dim) * 0.1
    targets = torch.randint(1, n, (rows,))
    weight[targets[:40]] = hidden[:40] * 3
    h, w = ((t * scale).to(dtype).cuda() for t in (hidden, weight))
    targets = targets.cuda()
    check_loss_against_truth(*full_pair(backend, targets), h, w)
    check_loss_against_truth(*sampled_pair(backend, targets, torch.randint(1, n, (37,), device="cuda")), h, w)


def heavy_duplicates(kind, dtype):
    """A loss call whose item gradient sums many rows into 3 items: float32 sums that round
    differently in any other order."""
    hidden = torch.randn(4096, 64, device="cuda").to(dtype)
    weight = torch.randn(20, 64, device="cuda").to(dtype)
    targets = torch.randint(1, 4, (4096,), device="cuda")
    negatives = torch.randint(1, 4, (4096, 16), device="cuda")

    def weight_grad(backend):
        w = weight.clone().requires_grad_()
        if kind == "full":
            loss = full_softmax_loss(hidden, w, targets, backend=backend)
        else:
            loss = sampled_softmax_loss(hidden, w, targets, negatives, remove_accidental_hits=False, backend=backend)
        loss.backward()
        return w.grad

    return weight_grad


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("kind", ["sampled", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_deterministic_item_gradient_is_bitwise_repeatable(backend, kind, dtype):
    weight_grad = heavy_duplicates(kind, dtype)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = weight_grad(backend)
        for _ in range(5):
            assert torch.equal(weight_grad(backend), first)
    finally:
        torch.use_deterministic_algorithms(previous)


def cuda_kernels(fn) -> list[str]:
    """The names of the device kernels (and memsets/copies) fn launches, by torch.profiler."""
    fn()  # compiled and cached: the counted call is a steady-state call
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in profile.events() if e.device_type == torch.autograd.DeviceType.CUDA]


FILLS = ("fill", "zero", "memset", "Memset")


@pytest.mark.skipif(not extension_has_cuda_kernels(), reason="seqrec_kernels._C has no CUDA kernels")
def test_gpu_cuda_attention_launches_its_kernels_only():
    """docs/cuda-backend.md: a forward+backward launches the attention kernels alone (3-4),
    no zero/full fill of out, LSE, dq, dk, dv or the delta workspace."""
    q, k, v = (torch.randn(4, 2, 50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    grad = torch.randn(4, 2, 50, 64, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.tensor([50, 9, 1, 0], device="cuda")

    def step():
        for t in (q, k, v):
            t.grad = None
        with value_checks(False):
            fused_attention(q, k, v, seq_lens=seq_lens, backend="cuda").backward(grad)

    kernels = cuda_kernels(step)
    assert not [name for name in kernels if any(fill in name for fill in FILLS)], kernels
    assert 2 <= len(kernels) <= 4, kernels


@pytest.mark.parametrize("backend", GPU_KERNELS)
@settings(max_examples=15)
@given(head_dim=st.sampled_from([160, 192, 200, 256]), length=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_gpu_attention_wide_heads_fuzz(backend, head_dim, length, seed):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (t.detach().cuda() for t in make_qkv(2, 2, length, head_dim, torch.bfloat16, generator=generator))
    seq_lens = torch.randint(0, length + 1, (2,), generator=generator).cuda()
    check_against_truth(q, k, v, seq_lens, "left", True, backend)
