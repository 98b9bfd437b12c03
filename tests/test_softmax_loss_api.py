"""The softmax losses' contract beyond the numbers: bad input, opcheck, torch.compile,
samplers, and (on a GPU) memory that does not grow with K or N."""

import math

import pytest
import torch

from backends_under_test import ALL, GPU_CUDA, op
from seqrec_kernels import full_softmax_loss, sampled_softmax_loss
from seqrec_kernels.data import PopularitySampler, UniformSampler, in_batch_negatives

BACKENDS = ALL
B, L, D, N, K = 2, 5, 16, 30, 7


def _inputs():
    return dict(
        hidden=torch.randn(B, L, D), item_weight=torch.randn(N, D), pos_ids=torch.randint(1, N, (B, L)),
        neg_ids=torch.randint(1, N, (K,)),
    )  # fmt: skip


def _sampled(**overrides):
    args = _inputs()
    args.update(overrides)
    return lambda: sampled_softmax_loss(
        args.pop("hidden"), args.pop("item_weight"), args.pop("pos_ids"), args.pop("neg_ids"), **args
    )


def _full(**overrides):
    args = _inputs()
    args.pop("neg_ids")
    args["targets"] = args.pop("pos_ids")
    args.update(overrides)
    return lambda: full_softmax_loss(args.pop("hidden"), args.pop("item_weight"), args.pop("targets"), **args)


BAD_INPUTS = [
    ("hidden rank", _sampled(hidden=torch.randn(D)), ValueError, "hidden: expected 2 dimensions [T, D] or 3"),
    ("hidden integer", _sampled(hidden=torch.ones(B, L, D, dtype=torch.long)), TypeError, "hidden: expected dtype"),
    ("weight D", _sampled(item_weight=torch.randn(N, D + 1)), ValueError, "item_weight: expected D=16 columns"),
    ("weight dtype", _sampled(item_weight=torch.randn(N, D).half()), TypeError, "item_weight: expected dtype"),
    ("weight device", _sampled(item_weight=torch.randn(N, D, device="meta")), ValueError, "item_weight: expected a"),
    ("pos shape", _sampled(pos_ids=torch.ones(B, L + 1, dtype=torch.long)), ValueError, "pos_ids: expected shape"),
    ("pos dtype", _sampled(pos_ids=torch.ones(B, L)), TypeError, "pos_ids: expected dtype"),
    ("pos range", _sampled(pos_ids=torch.full((B, L), N)), ValueError, "pos_ids: expected item ids in [0, 30)"),
    ("pos negative", _sampled(pos_ids=torch.full((B, L), -3)), ValueError, "pos_ids: expected item ids"),
    ("neg range", _sampled(neg_ids=torch.tensor([1, N + 5])), ValueError, "neg_ids: expected item ids in [0, 30)"),
    ("neg shape", _sampled(neg_ids=torch.ones(3, K, dtype=torch.long)), ValueError, "neg_ids: expected shape [K]"),
    ("neg dtype", _sampled(neg_ids=torch.ones(K)), TypeError, "neg_ids: expected dtype"),
    ("neg empty", _sampled(neg_ids=torch.ones(0, dtype=torch.long)), ValueError, "neg_ids: expected at least one"),
    ("pos_log_q shape", _sampled(pos_log_q=torch.zeros(B)), ValueError, "pos_log_q: expected shape (2, 5)"),
    ("neg_log_q shape", _sampled(neg_log_q=torch.zeros(K + 1)), ValueError, "neg_log_q: expected shape (7,)"),
    ("neg_log_q dtype", _sampled(neg_log_q=torch.zeros(K, dtype=torch.long)), TypeError, "neg_log_q: expected"),
    ("temperature 0", _sampled(temperature=0.0), ValueError, "temperature: expected a value > 0"),
    ("temperature inf", _sampled(temperature=math.inf), ValueError, "temperature"),
    ("reduction", _sampled(reduction="avg"), ValueError, "reduction: expected one of"),
    ("ignore_index type", _sampled(ignore_index=0.0), TypeError, "ignore_index: expected an int"),
    ("hits type", _sampled(remove_accidental_hits=None), TypeError, "remove_accidental_hits: expected a bool"),
    ("backend", _sampled(backend="tpu"), ValueError, "backend: expected one of"),
    (
        "float64 triton",
        _sampled(
            hidden=torch.randn(B, L, D, dtype=torch.float64),
            item_weight=torch.randn(N, D, dtype=torch.float64),
            backend="triton",
        ),
        TypeError,
        "hidden: the 'triton' backend takes",
    ),  # fmt: skip
    ("targets range", _full(targets=torch.full((B, L), N)), ValueError, "targets: expected item ids in [0, 30)"),
    (
        "targets excluded",
        _full(exclude_items=(0, 3), targets=torch.full((B, L), 3)),
        ValueError,
        "targets: a non-ignored target is an excluded item",
    ),  # fmt: skip
    ("exclude range", _full(exclude_items=(N,)), ValueError, "exclude_items: expected item ids in [0, 30)"),
    (
        "exclude all",
        _full(exclude_items=range(N), targets=torch.zeros(B, L, dtype=torch.long)),
        ValueError,
        "exclude_items: excludes all",
    ),  # fmt: skip
    ("full temperature", _full(temperature=-1.0), ValueError, "temperature"),
    ("full reduction", _full(reduction=None), ValueError, "reduction"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert message in str(raised.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_may_lie_outside_the_catalog(backend):
    pos = torch.randint(1, N, (B, L))
    pos[:, :2] = -100
    args = _inputs()
    loss = sampled_softmax_loss(args["hidden"], args["item_weight"], pos, args["neg_ids"], ignore_index=-100,
                                reduction="none", backend=backend)  # fmt: skip
    assert (loss[:, :2] == 0).all() and (loss[:, 2:] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden = torch.randn(9, D, requires_grad=True)
    weight = torch.randn(N, D, requires_grad=True)
    pos = torch.randint(1, N, (9,))
    pos[0] = 0
    for neg, rows_per_group in [(torch.randint(0, N, (1, K)), 9), (torch.randint(0, N, (3, K)), 3),
                                (torch.randint(0, N, (9, K)), 1)]:  # fmt: skip
        args = (hidden, weight, pos, neg, -torch.rand(9), -torch.rand(neg.shape), rows_per_group, True, 0.7, 0)
        torch.library.opcheck(op("sampled_softmax_fwd", backend).default, args)
    excluded = torch.tensor([0, 4], dtype=torch.int32)
    full_args = (hidden, weight, pos.clamp(min=5), excluded, 0.7, 0)
    torch.library.opcheck(op("full_softmax_fwd", backend).default, full_args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    embedding = torch.nn.Embedding(N, D)
    projection = torch.nn.Linear(D, D)
    pos = torch.randint(1, N, (B, L))
    neg = torch.randint(1, N, (B, K))

    def step(x):
        hidden = projection(x)
        return sampled_softmax_loss(hidden, embedding.weight, pos, neg, backend=backend) + full_softmax_loss(
            hidden, embedding.weight, pos, backend=backend
        )

    x = torch.randn(B, L, D)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    eager = step(x)
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(grad, embedding.weight.grad)


def test_uniform_sampler():
    sampler = UniformSampler(11)
    ids, log_q = sampler((200_000,))
    assert ids.min() >= 1 and ids.max() <= 10 and ids.dtype == torch.int64
    frequencies = torch.bincount(ids, minlength=11)[1:] / ids.numel()
    assert (frequencies - 0.1).abs().max() < 0.005  # 5 sigma
    torch.testing.assert_close(log_q, torch.full_like(log_q, -math.log(10)))
    generator = torch.Generator().manual_seed(3)
    again = UniformSampler(11)((50,), generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(sampler((50,), generator=generator)[0], again)
    no_padding = UniformSampler(4, padding_idx=None)((1000,))[0]
    assert set(no_padding.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.0])
def test_popularity_sampler(alpha):
    counts = torch.tensor([50, 0, 1, 10, 100, 3])  # item 0 is padding, item 1 never seen
    sampler = PopularitySampler(counts, alpha=alpha)
    ids, log_q = sampler((3, 100_000))
    expected = counts.double() ** alpha * (counts > 0)
    expected[0] = 0
    expected /= expected.sum()
    frequencies = torch.bincount(ids.reshape(-1), minlength=6).double() / ids.numel()
    sigma = (expected * (1 - expected) / ids.numel()).sqrt()
    assert ((frequencies - expected).abs() <= 5 * sigma + 1e-12).all(), (frequencies, expected)
    assert not (ids == 0).any() and not (ids == 1).any()
    torch.testing.assert_close(log_q, expected.log()[ids].float())


def test_popularity_sampler_rejects_bad_counts():
    with pytest.raises(ValueError, match="counts: expected at least one positive count"):
        PopularitySampler(torch.tensor([5, 0, 0]))
    with pytest.raises(ValueError, match="alpha"):
        PopularitySampler(torch.tensor([1, 2]), alpha=-1.0)


def test_in_batch_negatives():
    pos = torch.tensor([[0, 3, 3], [0, 5, 3]])
    ids, log_q = in_batch_negatives(pos)
    assert ids.tolist() == [3, 3, 5, 3]
    torch.testing.assert_close(log_q, torch.tensor([0.75, 0.75, 0.25, 0.75]).log())
    loss = sampled_softmax_loss(torch.randn(2, 3, D), torch.randn(N, D), pos, ids, neg_log_q=log_q)
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", GPU_CUDA])
@pytest.mark.parametrize("loss_name", ["sampled", "full"])
def test_gpu_extra_memory_does_not_grow_with_k_or_n(backend, loss_name):
    """A kernel's extra memory is O(T + N) beyond the gradients, whatever K or N: growing N
    16x and K 16x may grow the peak by the larger weight gradient (a float32 accumulator
    and its bfloat16 copy) and a little more, never by [T, K] or [T, N] logits."""
    rows, dim = 4096, 64

    def peak(num_items, num_neg):
        hidden = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(num_items, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pos = torch.randint(1, num_items, (rows,), device="cuda")
        neg = torch.randint(1, num_items, (num_neg,), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if loss_name == "sampled":
            loss = sampled_softmax_loss(hidden, weight, pos, neg, backend=backend)
        else:
            loss = full_softmax_loss(hidden, weight, pos, backend=backend)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    (small_n, small_k), (large_n, large_k) = (2048, 128), (32768, 2048)
    growth = peak(large_n, large_k) - peak(small_n, small_k)
    weight_gradient_growth = (large_n - small_n) * dim * (4 + 2)
    smallest_logits = rows * large_k * 4  # one [T, K] float32 tensor: 32 MiB
    assert growth < weight_gradient_growth + 2**20 < smallest_logits, growth


def test_sampled_triton_grid_fits_cuda_limits():
    """Millions of rows under one negative list stay within CUDA's grid limits (axis 0
    < 2^31, axes 1-2 <= 65,535): shape arithmetic only, on meta tensors."""
    from seqrec_kernels.triton.softmax_loss import _sampled_launch

    rows, dim = 5_000_000, 64
    hidden = torch.empty(rows, dim, device="meta")
    for groups, rows_per_group in ((1, rows), (rows // 50, 50), (rows, 1)):
        neg_ids = torch.empty(groups, 128, dtype=torch.long, device="meta")
        grid, _, _ = _sampled_launch(hidden, neg_ids, rows_per_group, None, None, True, backward=False)
        assert grid[0] < 2**31 and all(size <= 65_535 for size in grid[1:]), grid
