"""The loss modules: SampledSoftmaxLoss draws its negatives from the documented sampler
and applies the documented logQ terms (checked against the naive float64 loss over the
same draws), FullSoftmaxLoss is full_softmax_loss, and bad options raise naming the option."""

import math

import pytest
import torch

from backends_under_test import ALL
from loss_helpers import check_loss_against_truth, naive_full, naive_sampled
from seqrec_kernels import full_softmax_loss
from seqrec_kernels.data import PopularitySampler, UniformSampler
from seqrec_kernels.nn import FullSoftmaxLoss, SampledSoftmaxLoss

B, L, D, N, K = 3, 4, 8, 13, 5


def inputs():
    hidden, weight = torch.randn(B, L, D), torch.randn(N, D)
    pos_ids = torch.randint(1, N, (B, L))
    pos_ids[0, :2] = 0  # ignored positions
    pos_ids[1, 2] = pos_ids[1, 3]  # a repeated positive
    return hidden, weight, pos_ids


def expected_draw(sampler, negatives, counts, pos_ids, seed):
    """The negatives and log q terms the module must use: (neg_ids, log_q [shape of ids],
    log q of each positive [B, L], 0 at ignored positions)."""
    shape = {"shared": (K,), "per_sequence": (B, K), "per_row": (B, L, K)}[negatives]
    valid = pos_ids != 0
    if sampler == "in_batch":
        ids = pos_ids[valid]
        counts_in_batch = (ids[:, None] == ids[None, :]).sum(1)
        log_q = (counts_in_batch.double() / ids.numel()).log().float()
        pos_log_q = torch.zeros(pos_ids.shape)
        pos_log_q[valid] = log_q
        return ids, log_q, pos_log_q
    generator = torch.Generator().manual_seed(seed)
    if sampler == "uniform":
        ids, log_q = UniformSampler(N)(shape, generator=generator)
        return ids, log_q, torch.where(valid, -math.log(N - 1), 0.0)
    draw = PopularitySampler(counts, alpha=0.5)
    ids, log_q = draw(shape, generator=generator)
    return ids, log_q, torch.where(valid, draw.log_probs[pos_ids].float(), 0.0)


CASES = [
    ("uniform", "shared", "negatives"),
    ("uniform", "per_sequence", "all"),
    ("uniform", "per_row", "none"),
    ("popularity", "shared", "all"),
    ("popularity", "per_row", "negatives"),
    ("in_batch", "shared", "negatives"),
    ("in_batch", "shared", "all"),
    ("in_batch", "shared", "none"),
]


@pytest.mark.parametrize(("sampler", "negatives", "logq"), CASES)
def test_sampled_softmax_module_matches_naive_truth(sampler, negatives, logq, fresh_seed):
    """Per-row losses and both gradients against the naive float64 loss over the draws the
    documented sampler makes from the same generator state."""
    hidden, weight, pos_ids = inputs()
    counts = torch.randint(1, 50, (N,))  # every positive possible: logQ of the positive is finite
    options = dict(sampler=sampler, negatives=negatives, logq_correction=logq, reduction="none")
    if sampler != "in_batch":
        options.update(num_negatives=K, generator=torch.Generator().manual_seed(fresh_seed))
    if sampler == "popularity":
        options.update(item_counts=counts, alpha=0.5)
    module = SampledSoftmaxLoss(**options, backend="reference")
    neg_ids, log_q, pos_log_q = expected_draw(sampler, negatives, counts, pos_ids, fresh_seed)
    neg_log_q = None if logq == "none" else log_q
    pos_log_q = pos_log_q if logq == "all" else None

    def naive(h, w):
        q_pos = None if pos_log_q is None else pos_log_q.to(h.dtype)
        q_neg = None if neg_log_q is None else neg_log_q.to(h.dtype)
        return naive_sampled(h, w, pos_ids, neg_ids, q_pos, q_neg, True, 1.0, 0)

    check_loss_against_truth(lambda h, w: module(h, w, pos_ids), naive, hidden, weight)


@pytest.mark.parametrize("backend", ALL)
def test_loss_modules_run_every_backend(backend):
    """Each backend through the modules: the full loss equals the functional op and the
    naive truth; the sampled loss (shared uniform negatives, temperature) the naive truth."""
    hidden, weight, pos_ids = inputs()
    full = FullSoftmaxLoss(temperature=0.5, exclude_items=(0, 7), reduction="none", backend=backend)
    pos_ids[pos_ids == 7] = 8
    check_loss_against_truth(
        lambda h, w: full(h, w, pos_ids), lambda h, w: naive_full(h, w, pos_ids, (0, 7), 0.5, 0), hidden, weight
    )
    mean = FullSoftmaxLoss(temperature=0.5, exclude_items=(0, 7), backend=backend)(hidden, weight, pos_ids)
    functional = full_softmax_loss(hidden, weight, pos_ids, temperature=0.5, exclude_items=(0, 7), backend=backend)
    assert torch.equal(mean, functional)
    seed = int(torch.randint(2**31, ()))
    sampled = SampledSoftmaxLoss(
        K, temperature=0.5, reduction="none", backend=backend, generator=torch.Generator().manual_seed(seed)
    )
    neg_ids, log_q = UniformSampler(N)((K,), generator=torch.Generator().manual_seed(seed))
    check_loss_against_truth(
        lambda h, w: sampled(h, w, pos_ids),
        lambda h, w: naive_sampled(h, w, pos_ids, neg_ids, None, log_q.to(h.dtype), True, 0.5, 0),
        hidden,
        weight,
    )


def test_in_batch_all_ignored_batch_is_zero():
    """No positive, so no in-batch negative: the loss is 0 with zero gradients, not an error."""
    hidden, weight = torch.randn(B, L, D, requires_grad=True), torch.randn(N, D, requires_grad=True)
    loss = SampledSoftmaxLoss(sampler="in_batch", logq_correction="all")(hidden, weight, torch.zeros(B, L).long())
    loss.backward()
    assert loss.item() == 0.0 and not hidden.grad.any() and not weight.grad.any()


BAD_OPTIONS = [
    ({}, ValueError, "num_negatives: expected an int >= 1 for sampler='uniform'"),
    ({"num_negatives": 0}, ValueError, "num_negatives: expected an int >= 1"),
    ({"sampler": "in_batch", "num_negatives": 4}, ValueError, "num_negatives: in-batch negatives"),
    ({"sampler": "in_batch", "negatives": "per_row"}, ValueError, "negatives: in-batch negatives are one shared"),
    ({"num_negatives": 4, "sampler": "popularity"}, ValueError, "item_counts: the popularity sampler needs"),
    ({"num_negatives": 4, "item_counts": torch.ones(N)}, ValueError, "item_counts: the popularity sampler needs"),
    ({"num_negatives": 4, "sampler": "zipf"}, ValueError, "sampler: expected one of"),
    ({"num_negatives": 4, "negatives": "per_item"}, ValueError, "negatives: expected one of"),
    ({"num_negatives": 4, "logq_correction": True}, ValueError, "logq_correction: expected one of"),
    ({"num_negatives": 4, "temperature": 0.0}, ValueError, "temperature: expected a value > 0"),
    ({"num_negatives": 4, "reduction": "avg"}, ValueError, "reduction: expected one of"),
    ({"num_negatives": 4, "backend": "cudnn"}, ValueError, "backend: expected one of"),
    ({"num_negatives": 4, "generator": 3}, TypeError, "generator: expected None or a torch.Generator"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_sampled_softmax_module_bad_options(options, error, message):
    with pytest.raises(error, match=f"^{message}"):
        SampledSoftmaxLoss(**options)


def test_bad_module_input():
    hidden, weight, pos_ids = inputs()
    with pytest.raises(ValueError, match=r"^hidden: negatives='per_sequence' needs \[B, L, D\]"):
        SampledSoftmaxLoss(K, negatives="per_sequence")(hidden[0], weight, pos_ids[0])
    popularity = SampledSoftmaxLoss(K, sampler="popularity", item_counts=torch.ones(N + 1))
    with pytest.raises(ValueError, match="^item_weight: expected N=14 rows"):
        popularity(hidden, weight, pos_ids)
    with pytest.raises(TypeError, match="^pos_ids: expected dtype"):
        SampledSoftmaxLoss(K)(hidden, weight, pos_ids.float())
    with pytest.raises(ValueError, match="^exclude_items: expected non-negative item ids"):
        FullSoftmaxLoss(exclude_items=(-1,))
    with pytest.raises(TypeError, match="^return_lse: expected a bool"):
        FullSoftmaxLoss(return_lse=1)
    loss, lse = FullSoftmaxLoss(return_lse=True)(hidden, weight, pos_ids)
    assert loss.shape == () and lse.shape == (B, L)
