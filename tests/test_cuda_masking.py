"""Out-of-range item ids where no host check runs (torch.compile, CUDA graph capture): the
kernels mask them instead of touching memory. An absent negative (id outside [0, N))
leaves the denominator and gets no gradient; a row whose positive or target is outside
[0, N) counts as ignored (loss 0, no gradient, not counted by `mean`).

On CPU the extension's backend is `cpp`, its C++ CPU implementation, which checks id values itself;
`unchecked_ids` turns that check off so that its masking is compared with Triton's and
with the reference on the equivalent in-range input. On a GPU the same tests run the
CUDA kernels (tile engine for shared negatives, warp-per-row kernels, sorted d weight)."""

from contextlib import contextmanager

import pytest
import torch

from backends_under_test import extension_backend
from seqrec_kernels import full_softmax_loss, sampled_softmax_loss, value_checks
from seqrec_kernels.backends import EXTENSION_ERROR, extension_has_cuda_kernels

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

# 20 rows per sequence: shared and per-sequence negatives run the tile engine on a GPU
# (16 rows per list or more), per-row negatives the warp-per-row kernels.
B, L, D, N, K = 3, 20, 24, 150, 12
# Absent ids: just past either end, far past, and 2**32 + 3 (item 3 if truncated to 32 bits).
OUT_OF_RANGE = (N, N + 7, -1, -(2**40), 2**32 + 3)
ABSENT_COLUMNS = (1, 4, 5, 9, 11)  # the negative slots holding them, in every list
KEPT_COLUMNS = [k for k in range(K) if k not in ABSENT_COLUMNS]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not extension_has_cuda_kernels(), reason="no CUDA kernels built")]
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


@pytest.fixture
def unchecked_ids():
    """Id values reach the ops unchecked: the Python check is off (value_checks(False), as
    in the trainer's loop and under torch.compile), the C++ CPU ops' check is turned off."""
    previous = torch.ops.seqrec._set_item_id_checks(False)
    with value_checks(False):
        yield
    torch.ops.seqrec._set_item_id_checks(previous)


def _positives(device):
    """[B, L] positives: in range, ignored (0) and out of range; and the in-range
    equivalent (out of range -> ignored)."""
    pos = torch.randint(1, N, (B, L))
    pos[:, :3] = 0
    for i, bad in enumerate(OUT_OF_RANGE):
        pos[i % B, 3 + i] = bad
    equivalent = torch.where((pos >= 0) & (pos < N), pos, 0)
    return pos.to(device), equivalent.to(device)


def _negatives(layout, pos, device):
    """Negatives of `layout` with OUT_OF_RANGE in ABSENT_COLUMNS of every list, some
    accidental hits; and the equivalent lists without those columns."""
    shape = {"shared [K]": (K,), "per sequence [B, K]": (B, K), "per row [B, L, K]": (B, L, K)}[layout]
    neg = torch.randint(1, N, shape, device=device)
    if layout == "per row [B, L, K]":
        neg[..., 0] = pos  # accidental hits, out of range where the positive is (an ignored row)
    neg[..., list(ABSENT_COLUMNS)] = torch.tensor(OUT_OF_RANGE, device=device)
    kept = neg[..., KEPT_COLUMNS]
    return neg, torch.where((kept >= 0) & (kept < N), kept, 1)  # any id serves an ignored row


@contextmanager
def deterministic_algorithms(enabled):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _loss_and_grads(loss_fn, hidden, weight, reduction):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, reduction)
    dout = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape)
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight), dout))


def _assert_same(ours, expected):
    for name, a, b in zip(("loss", "d hidden", "d item_weight"), ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _sampled(pos, neg, backend, log_q=False, **options):
    neg_log_q = -torch.rand(neg.shape, generator=torch.Generator().manual_seed(1)).to(neg.device) if log_q else None

    def loss_fn(hidden, weight, reduction):
        return sampled_softmax_loss(hidden, weight, pos, neg, neg_log_q=neg_log_q, reduction=reduction,
                                    backend=backend, **options)  # fmt: skip

    return loss_fn, neg_log_q


LAYOUTS = ["shared [K]", "per sequence [B, K]", "per row [B, L, K]"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("remove_hits", [True, False])
def test_sampled_cuda_masks_like_triton(unchecked_ids, device, layout, remove_hits):
    hidden, weight = torch.randn(B, L, D, device=device), torch.randn(N, D, device=device)
    pos, _ = _positives(device)
    neg, _ = _negatives(layout, pos, device)
    results = [
        _loss_and_grads(_sampled(pos, neg, backend, log_q=True, remove_accidental_hits=remove_hits)[0],
                        hidden, weight, "none")
        for backend in (extension_backend(device), "triton")
    ]  # fmt: skip
    _assert_same(*results)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "backend, deterministic", [("triton", False), ("extension", False), ("triton", True), ("extension", True)]
)
def test_sampled_masking_equals_the_in_range_input(unchecked_ids, device, layout, backend, deterministic):
    """Out-of-range positives -> ignored rows, absent negatives -> dropped columns: the
    same loss (also `mean`, which counts only the remaining rows) and gradients as the
    reference on that input, in both d item_weight modes."""
    backend = extension_backend(device) if backend == "extension" else backend
    hidden, weight = torch.randn(B, L, D, device=device), torch.randn(N, D, device=device)
    pos, pos_equivalent = _positives(device)
    neg, neg_equivalent = _negatives(layout, pos, device)
    ours, neg_log_q = _sampled(pos, neg, backend, log_q=True)

    def expected(h, w, reduction):
        return sampled_softmax_loss(h, w, pos_equivalent, neg_equivalent, neg_log_q=neg_log_q[..., KEPT_COLUMNS],
                                    reduction=reduction, backend="reference")  # fmt: skip

    with deterministic_algorithms(deterministic):
        for reduction in ("none", "mean"):
            _assert_same(_loss_and_grads(ours, hidden, weight, reduction),
                         _loss_and_grads(expected, hidden, weight, reduction))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "extension"])
def test_full_out_of_range_targets_are_ignored_rows(unchecked_ids, device, backend):
    backend = extension_backend(device) if backend == "extension" else backend
    hidden, weight = torch.randn(B, L, D, device=device), torch.randn(N, D, device=device)
    targets, equivalent = _positives(device)

    def loss_of(t, backend_name):
        return lambda h, w, reduction: full_softmax_loss(h, w, t, reduction=reduction, backend=backend_name)

    for reduction in ("none", "mean"):
        _assert_same(_loss_and_grads(loss_of(targets, backend), hidden, weight, reduction),
                     _loss_and_grads(loss_of(equivalent, "reference"), hidden, weight, reduction))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_with_out_of_range_ids(device):
    """Under torch.compile the Python value check does not run. On a GPU the kernels mask
    the ids; on CPU the C++ ops still check them (a clear error), and mask with the check off."""
    torch._dynamo.reset()
    hidden, weight = torch.randn(B, L, D, device=device), torch.randn(N, D, device=device)
    pos, pos_equivalent = _positives(device)
    neg, neg_equivalent = _negatives("per sequence [B, K]", pos, device)

    native = extension_backend(device)

    def step(h, w, p, n, backend=native):
        return sampled_softmax_loss(h, w, p, n, backend=backend) + full_softmax_loss(h, w, p, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(hidden, weight, pos_equivalent, neg_equivalent, "reference")  # the in-range input's definition
    if device == "cpu":
        with pytest.raises(ValueError, match=r"pos_ids: expected item ids in \[0, 150\)"):
            compiled(hidden, weight, pos, neg)
        previous = torch.ops.seqrec._set_item_id_checks(False)
        try:
            torch.testing.assert_close(compiled(hidden, weight, pos, neg), expected, atol=1e-5, rtol=1e-5)
        finally:
            torch.ops.seqrec._set_item_id_checks(previous)
    else:
        torch.testing.assert_close(compiled(hidden, weight, pos, neg), expected, atol=1e-5, rtol=1e-5)


def test_item_id_checks_are_on_by_default():
    assert torch.ops.seqrec._set_item_id_checks(True) is True
