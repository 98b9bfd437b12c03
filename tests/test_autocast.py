"""torch.autocast: every fused op computes on 16-bit operands (its autocast rule casts the
matmul operands; losses and LSE stay float32), exactly as if the caller had cast them,
and a SASRec training step under autocast feeds 16-bit operands to every fused op. The
extension's ops under torch's "medium" float32 matmul precision: bfloat16 operands; on a GPU,
the kernels' float32 "high" (3xTF32) and "medium" (bfloat16) modes against the float64 truth."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import seqrec_kernels as sk
from backends_under_test import ALL, GPU_CUDA
from seqrec_kernels.backends import EXTENSION_ERROR
from seqrec_kernels.data.packed import PackedBatch
from seqrec_kernels.models import SASRec, SASRecConfig
from seqrec_kernels.models.sasrec import negative_sampler, sample_negatives

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def attention(q, k, v, backend):
    return sk.fused_attention(q, k, v, seq_lens=torch.tensor([7, 3]), dropout_p=0.2, backend=backend)


def sampled(hidden, weight, backend):
    return sk.sampled_softmax_loss(hidden, weight, torch.tensor([3, 0, 9, 1, 12]), torch.tensor([2, 5, 11]),
                                   backend=backend)  # fmt: skip


def full(hidden, weight, backend):
    return sk.full_softmax_loss(hidden, weight, torch.tensor([3, 0, 9, 1, 12]), backend=backend)


def packed_attention(q, k, v, backend):
    """Packed sequences of 5, 0 and 9 tokens, then a tail of 2 (the first GPU run's crash: the
    packed reference's backward under bf16 autocast, index_copy_ of a bfloat16 product)."""
    cu_seqlens = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    return sk.fused_attention_varlen(q, k, v, cu_seqlens, 9, dropout_p=0.2, backend=backend)


CASES = {
    "attention": (attention, [(2, 2, 7, 8)] * 3),  # q, k, v [B, H, L, D]
    "packed attention": (packed_attention, [(16, 2, 8)] * 3),  # q, k, v [T, H, D]
    "sampled": (sampled, [(5, 8), (13, 8)]),  # hidden [T, D], item_weight [N, D]
    "full": (full, [(5, 8), (13, 8)]),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_autocast_is_the_same_op_on_cast_operands(case, dtype, backend):
    op, shapes = CASES[case]
    inputs = [torch.randn(shape) for shape in shapes]

    def run(autocast):
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(0)  # the same dropout seed
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            out = op(*(leaves if autocast else [t.to(dtype) for t in leaves]), backend)
            out.float().square().sum().backward()  # inside the region, as training loops do
        return out, [t.grad for t in leaves]

    (out, grads), (expected, expected_grads) = run(autocast=True), run(autocast=False)
    assert out.dtype == (dtype if case.endswith("attention") else torch.float32)
    assert torch.equal(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32 and torch.equal(grad, expected_grad)


@pytest.fixture
def matmul_precision():
    """Sets torch's float32 matmul precision for the test; restores it after."""
    previous = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("case", CASES)
def test_medium_float32_precision_gives_the_extension_bfloat16_operands(case, matmul_precision):
    """cpp (and cuda, the same glue) under "medium": float32 operands multiplied as bfloat16
    copies, i.e. exactly the op on bfloat16 casts, outputs and gradients back in float32."""
    if EXTENSION_ERROR is not None:
        pytest.skip(str(EXTENSION_ERROR))
    op, shapes = CASES[case]
    inputs = [torch.randn(shape) for shape in shapes]

    def run(precision, cast):
        matmul_precision(precision)
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(0)  # the same dropout seed
        out = op(*(t.to(torch.bfloat16) if cast else t for t in leaves), "cpp").float()
        out.square().sum().backward()
        return [out, *(t.grad for t in leaves)]

    medium, cast, highest = run("medium", cast=False), run("highest", cast=True), run("highest", cast=False)
    assert all(m.dtype == torch.float32 and torch.equal(m, c) for m, c in zip(medium, cast))
    assert not torch.equal(medium[0], highest[0])  # "highest" keeps float32 operands


class OperandDtypes(TorchDispatchMode):
    """The dtypes of the matmul operands of every seqrec forward op called (q, k, v; hidden, item_weight)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("seqrec::") and "_fwd_" in name:
            operands = 3 if name.startswith("seqrec::attention") else 2
            self.seen.setdefault(name, set()).update(a.dtype for a in args[:operands])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batching", ["padded", "packed"])
@pytest.mark.parametrize("loss", ["sampled_softmax", "full_softmax"])
def test_sasrec_step_under_autocast_feeds_16bit_operands_to_every_fused_op(loss, batching):
    config = SASRecConfig(num_items=30, max_len=9, hidden=16, heads=2, loss=loss, num_negatives=6)
    model = SASRec(config).train()
    histories = torch.randint(1, 31, (3, 9))
    histories[1, :4] = 0  # left padding
    targets = torch.where(histories != 0, torch.randint(1, 31, histories.shape), 0)
    if batching == "packed":
        batch = PackedBatch.from_padded(histories, targets, max_len=9, bucket=1)
        histories, targets = batch, batch.targets
    negatives = sample_negatives(config, negative_sampler(config), tuple(targets.shape))
    dtypes = OperandDtypes()
    with dtypes, torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(histories, targets, negatives).backward()
    loss_op = "sampled_softmax" if loss == "sampled_softmax" else "full_softmax"
    assert {name.split("_fwd_")[0] for name in dtypes.seen} == {"seqrec::attention", f"seqrec::{loss_op}"}
    assert all(seen == {torch.bfloat16} for seen in dtypes.seen.values()), dtypes.seen
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def _gpu_cases():
    """(op, inputs) at sizes that span several tiles: attention [3, 2, 70, 64] with lengths
    70/41/5, losses over 300 rows of 64 and 1,000 items (128 shared negatives)."""
    targets = torch.randint(0, 1000, (300,))
    negatives = torch.randint(0, 1000, (128,))
    return {
        "attention": (
            lambda q, k, v, b: sk.fused_attention(
                q, k, v, seq_lens=torch.tensor([70, 41, 5], device=q.device), backend=b
            ),
            [torch.randn(3, 2, 70, 64) for _ in range(3)],
        ),
        "sampled": (
            lambda h, w, b: sk.sampled_softmax_loss(h, w, targets.to(h.device), negatives.to(h.device), backend=b),
            [torch.randn(300, 64), torch.randn(1000, 64)],
        ),
        "full": (
            lambda h, w, b: sk.full_softmax_loss(h, w, targets.to(h.device), backend=b),
            [torch.randn(300, 64), torch.randn(1000, 64)],
        ),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", GPU_CUDA])
@pytest.mark.parametrize("precision", ["high", "medium"])
@pytest.mark.parametrize("case", CASES)
def test_gpu_float32_precision_modes_keep_their_tolerance(case, precision, backend, matmul_precision):
    """float32 inputs on the GPU kernels under "high" (3xTF32) stay within 3x the error of
    float32 IEEE arithmetic (the reference under "highest"), and under "medium" within 3x
    that of the reference on bfloat16 casts, for the output and every gradient, against
    the float64 truth (plus a floor of 1e-5 of the truth's largest magnitude)."""
    torch.manual_seed(12)
    op, inputs = _gpu_cases()[case]
    upstream = None  # one fixed upstream gradient for every run

    def run(backend, dtype, precision, device):
        nonlocal upstream
        matmul_precision(precision)
        leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in inputs]
        out = op(*leaves, backend)
        if upstream is None:
            upstream = torch.randn(out.shape, dtype=torch.float64)
        (out.double() * upstream.to(out.device)).sum().backward()
        return [out.detach().double().cpu(), *(t.grad.double().cpu() for t in leaves)]

    truth = run("reference", torch.float64, "highest", "cpu")
    baseline_dtype = torch.float32 if precision == "high" else torch.bfloat16
    baseline = run("reference", baseline_dtype, "highest", "cuda")
    got = run(backend, torch.float32, precision, "cuda")
    for name, g, b, t in zip(["out", *(f"grad {i}" for i in range(len(inputs)))], got, baseline, truth):
        error, allowed = (g - t).abs().max().item(), 3 * (b - t).abs().max().item() + 1e-5 * t.abs().max().item()
        assert error <= allowed, f"{case} {precision} {backend} {name}: error {error:.3g} > {allowed:.3g}"
