"""Mutations that the suite's checks must catch (issue 28): each case puts the code into a
broken state (a kernel that returns zeros, zero gradients, a host read in the training
step) and asserts that the check meant to see it fails. A check these mutations pass is a
check that cannot fail."""

import math

import pytest
import sanitizer_grid
import test_autocast as autocast_tests
import test_softmax_loss as loss_tests
import torch
from host_reads import HostReadCounter

import attention_helpers
from attention_helpers import assert_flash_rule, check_against_truth, make_qkv
from backends_under_test import CPP
from loss_helpers import check_loss_against_truth, full_pair, sampled_pair
from seqrec_kernels import fused_attention, value_checks
from seqrec_kernels.backends import triton_interpreter_enabled
from seqrec_kernels.models import SASRec, SASRecConfig
from seqrec_kernels.ops import _front, _library
from seqrec_kernels.triton import attention as triton_attention
from seqrec_kernels.triton import softmax_loss as triton_loss

HALF = [torch.bfloat16, torch.float16]


class ZeroGradients(torch.autograd.Function):
    """The true forward, all-zero gradients: a backward that writes nothing."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.shapes = [t for t in inputs]
        return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(torch.zeros_like(t) for t in ctx.shapes))


def zero_loss(ours):
    """A loss that returns zeros (loss and gradients) in the op's output dtypes."""
    return lambda h, w: torch.zeros_like(ours(h, w)) + 0 * (h.sum() + w.sum()).float()


def zero_loss_gradients(ours):
    return lambda h, w: ZeroGradients.apply(ours, h, w)


def loss_cases():
    """(name, pair arguments, hidden, weight): the regimes where the old floors accepted zeros."""
    rows, dim, n = 24, 64, 70
    hidden, weight = torch.randn(rows, dim), torch.randn(n, dim) * 0.5
    targets = torch.randint(1, n, (rows,))
    negatives = torch.randint(1, n, (2, 12, 17))
    for dtype in [*HALF, torch.float32]:
        h, w = hidden.to(dtype), weight.to(dtype)
        yield f"sampled {dtype} T=0.05", sampled_pair("reference", targets.view(2, 12), negatives, temperature=0.05), \
            h.view(2, 12, dim), w  # fmt: skip
        yield f"full {dtype} T=0.1", full_pair("reference", targets, temperature=0.1), h, w
        peaked = weight.clone()
        peaked[targets[:4]] = hidden[:4] * 3  # test_sharply_peaked_and_huge_logits' data
        yield f"full peaked {dtype}", full_pair("reference", targets), h, peaked.to(dtype)


@pytest.mark.parametrize("mutation", [zero_loss, zero_loss_gradients])
def test_loss_rule_rejects_zeros(mutation):
    for name, (ours, naive), hidden, weight in loss_cases():
        check_loss_against_truth(ours, naive, hidden, weight)  # the control: the real op passes
        with pytest.raises(AssertionError, match="max error"):
            check_loss_against_truth(mutation(ours), naive, hidden, weight)
            pytest.fail(f"{name}: {mutation.__name__} passed")


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_attention_rule_rejects_zeros(dtype, monkeypatch):
    q, k, v = make_qkv(3, 2, 17, 50, dtype)
    seq_lens = torch.tensor([17, 9, 1])
    check_against_truth(q, k, v, seq_lens, "left", True, "reference", dropout_p=0.3)  # the control
    fused = attention_helpers.fused_attention

    def zero_out(q, k, v, **options):
        out, lse = fused(q, k, v, **options)
        return out * 0, lse

    def zero_grads(q, k, v, **options):
        out, lse = fused(q.detach(), k.detach(), v.detach(), **options)
        return ZeroGradients.apply(lambda *_: out, q, k, v), lse

    for mutation in (zero_out, zero_grads):
        monkeypatch.setattr(attention_helpers, "fused_attention", mutation)
        with pytest.raises(AssertionError, match="max error"):
            check_against_truth(q, k, v, seq_lens, "left", True, "reference", dropout_p=0.3)


def test_flash_rule_refuses_a_meaningless_baseline():
    """A naive baseline off by the truth's own size (naive bfloat16 logits of a low-temperature
    loss), or a floor scaled past the truth: a rule built on either would accept zeros, so it
    raises instead of passing."""
    truth = torch.randn(30, 20, dtype=torch.float64)
    with pytest.raises(AssertionError, match="accept zeros"):
        assert_flash_rule("out", torch.zeros_like(truth), truth, -truth, torch.bfloat16, 2)
    with pytest.raises(AssertionError, match="accept zeros"):
        assert_flash_rule("out", truth, truth, truth, torch.float32, 2, floor_scale=1e7)


def sasrec_loss_step(loss):
    """One padded SASRec loss + backward on `cpp`, as the training step runs it."""
    torch.manual_seed(0)
    config = SASRecConfig(num_items=40, max_len=9, hidden=16, blocks=1, heads=2, dropout=0.0, loss=loss)
    model = SASRec(config).set_backend("cpp")
    lengths = torch.tensor([9, 4, 1])
    histories = torch.where(torch.arange(9) >= 9 - lengths[:, None], torch.randint(1, 41, (3, 9)), 0)
    targets = torch.where(histories != 0, torch.randint(1, 41, (3, 9)), 0)
    negatives = torch.randint(1, 41, (config.num_negatives,)), torch.zeros(config.num_negatives)  # (ids, log_q)

    def step():
        with value_checks(False):  # on CPU tensors the ids' range checks read them (the CPU path)
            model.loss(histories, targets, negatives).backward()

    return step


HOST_READ_MUTATIONS = {
    "NaN guard by mask indexing": lambda loss: loss[torch.isfinite(loss)].sum(),
    "torch.equal": lambda loss: loss * torch.equal(loss, loss),
    "bool()": lambda loss: loss if bool(torch.isfinite(loss)) else loss * 0,
    "repeat_interleave(tensor)": lambda loss: loss.reshape(1).repeat_interleave(torch.ones(1, dtype=torch.long))[0],
    "bincount": lambda loss: loss + torch.bincount(torch.zeros(3, dtype=torch.long)).sum() * 0,
    ".cpu()": lambda loss: loss + loss.detach().cpu() * 0,
}


@pytest.mark.parametrize("mutation", HOST_READ_MUTATIONS)
@pytest.mark.parametrize("backend", [CPP])
def test_host_read_in_the_loss_is_caught(mutation, backend, monkeypatch):
    step = sasrec_loss_step("sampled_softmax")
    with HostReadCounter() as counter:
        step()
    assert counter.reads == []  # the control: the real step reads nothing
    real_loss = SASRec.loss
    monkeypatch.setattr(SASRec, "loss", lambda *a, **kw: HOST_READ_MUTATIONS[mutation](real_loss(*a, **kw)))
    with HostReadCounter() as counter:
        step()
    assert counter.reads, f"{mutation} was not seen"


def test_zero_gradients_helper_is_a_mutation():
    """ZeroGradients keeps the forward: only the gradients are wrong."""
    x = torch.randn(3, requires_grad=True)
    out = ZeroGradients.apply(lambda t: t * 2, x)
    out.sum().backward()
    assert torch.equal(out, x.detach() * 2) and (x.grad == 0).all() and not math.isnan(out.sum().item())


shuffled_programs = loss_tests.shuffled_programs  # the fixture: Triton's interpreter runs programs in random order


@pytest.mark.skipif(not triton_interpreter_enabled(), reason="reorders the programs of Triton's interpreter")
def test_atomics_in_deterministic_mode_fail_the_program_order_test(shuffled_programs, monkeypatch):
    """The item gradient scattered by atomics although deterministic mode is on."""
    backward = triton_loss.sampled_backward
    monkeypatch.setattr(triton_loss, "sampled_backward", lambda *args: backward(*args[:-1], False))
    with pytest.raises(AssertionError, match="sampled loss"):
        loss_tests.test_triton_deterministic_paths_ignore_program_order(
            "sampled loss, deterministic mode", shuffled_programs
        )


def test_sanitizer_grid_reports_misses_and_runs_on(monkeypatch, capsys):
    """A case that misses the tolerance is printed and counted, and the grid goes on (so
    memcheck sees every case); the count makes the script exit 1."""
    ran = []

    def first_misses(*args, **kwargs):
        ran.append(args)
        if len(ran) == 1:
            raise AssertionError("out: max error 1 > 2 x naive 0 + floor 0")

    monkeypatch.setattr(sanitizer_grid, "check_against_truth", first_misses)
    monkeypatch.setattr(sanitizer_grid, "check_loss_against_truth", first_misses)
    assert sanitizer_grid.run_grid("cpu", quick=True) == 1
    output = capsys.readouterr().out
    assert len(ran) == 21 and output.count("MISS ") == 1 and "21 cases ran, 1 missed" in output


def test_attention_without_its_autocast_rule_fails_the_autocast_test(monkeypatch):
    """The SASRec autocast test cannot see this (its q, k, v leave an autocast Linear in
    bfloat16 already); the per-op test does. On the general path: the C++ front's own cast rule
    is held to it bitwise by tests/test_host_path.py's front tests (autocast mode)."""
    monkeypatch.setattr(_front, "front_checks", lambda *args: None)
    test = autocast_tests.test_autocast_is_the_same_op_on_cast_operands
    test("attention", torch.bfloat16, "triton")  # the control
    monkeypatch.setattr(_library, "_autocast_cast", lambda arg, device_type, dtype: arg)
    with pytest.raises(AssertionError):
        test("attention", torch.bfloat16, "triton")


def test_host_read_in_a_triton_launcher_is_caught(monkeypatch):
    """A read inside an op's implementation, on the eager path users run (a launcher that
    sizes its grid from a device value)."""
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))

    def call():
        with value_checks(False):
            fused_attention(q, k, v, seq_lens=torch.tensor([9, 4]), backend="triton").sum().backward()

    with HostReadCounter() as counter:
        call()
    assert counter.reads == []  # the control
    forward = triton_attention.attention_forward
    monkeypatch.setattr(triton_attention, "attention_forward", lambda *args: forward(*args[:5], int(args[4].max()),
                                                                                     *args[6:]))  # fmt: skip
    with HostReadCounter() as counter:
        call()
    assert counter.reads == ["_local_scalar_dense"]
