"""The SASRec model: parts against hand computation, padding invariance, backends agreeing."""

import copy
import math

import pytest
import torch

from backends_under_test import KERNELS
from seqrec_kernels.models import SASRec, SASRecConfig
from seqrec_kernels.models.sasrec import Layout, negative_sampler, sample_negatives


def model(**overrides):
    config = dict(num_items=40, max_len=12, hidden=16, blocks=2, heads=2, dropout=0.0)
    config.update(overrides)
    return SASRec(SASRecConfig(**config)).eval()


def histories():
    """Left-padded histories of lengths 12, 5, 1 and 0."""
    h = torch.randint(1, 41, (4, 12))
    h[1, :7] = 0
    h[2, :11] = 0
    h[3] = 0
    return h


def test_embedding_part_by_hand():
    m = model(blocks=0)
    h = histories()
    expected = m.item_embedding(h) * math.sqrt(16) + m.position_embedding.weight  # positions 0..11
    expected = torch.nn.functional.layer_norm(expected * (h != 0)[..., None], (16,), eps=1e-8)
    torch.testing.assert_close(m(h), expected)
    assert (m.item_embedding.weight[0] == 0).all()


def test_block_follows_the_authors_arrangement():
    """One block by hand: normed queries attend over raw keys/values (causal, padding
    masked), the normed queries are the residual, then a residual feed-forward on the
    layer-normed sum."""
    m = model(blocks=1, heads=1)
    block = m.blocks[0]
    x = torch.randn(2, 12, 16)
    seq_lens = torch.tensor([12, 4])
    real = torch.arange(12)[None, :] >= 12 - seq_lens[:, None]
    queries = block.attention_norm(x)
    q, k, v = block.attention.query(queries), block.attention.key(x), block.attention.value(x)
    visible = real[:, None, :] & real[:, :, None] & torch.ones(12, 12, dtype=torch.bool).tril()
    scores = (q @ k.transpose(1, 2) / 4).masked_fill(~visible, -math.inf)
    attention = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    y = block.feed_forward_norm(queries + attention * real[..., None])
    expected = y + block.feed_forward(y)
    torch.testing.assert_close(block(x, Layout(seq_lens=seq_lens), m.backend), expected)


def test_left_padding_never_changes_real_positions():
    """A history's outputs do not depend on its batch mates or on the batch's lengths."""
    m = model()
    h = histories()
    together = m(h)
    for row in range(3):
        alone = m(h[row : row + 1])
        real = h[row] != 0
        torch.testing.assert_close(together[row, real], alone[0, real])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("norm_first", [False, True])
def test_backends_agree_on_the_whole_model(backend, norm_first):
    reference = model(norm_first=norm_first).set_backend("reference")
    kernel = copy.deepcopy(reference).set_backend(backend)
    h = histories()
    targets = torch.where(h != 0, torch.randint(1, 41, h.shape), 0)
    negatives = (torch.randint(1, 41, (*h.shape, 1)), torch.zeros(*h.shape, 1))
    outputs = []
    for m in (reference, kernel):
        m.train()
        loss = m.loss(h, targets, negatives)
        loss.backward()
        outputs.append((loss, [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", ["bce", "gbce", "sampled_softmax", "full_softmax"])
def test_every_loss_trains(loss):
    torch.manual_seed(0)
    m = model(loss=loss, num_negatives=8).train()
    h = histories()
    targets = torch.where(h != 0, torch.randint(1, 41, h.shape), 0)
    optimizer = torch.optim.Adam(m.parameters(), lr=1e-2)
    sampler = negative_sampler(m.config, item_counts=torch.ones(41))
    losses = []
    for _ in range(30):
        value = m.loss(h, targets, sample_negatives(m.config, sampler, targets.shape, users=torch.arange(4)))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_recommend_excludes_padding_and_seen_items():
    m = model()
    h = histories()
    ids, scores = m.recommend(h, k=5)
    assert ids.shape == scores.shape == (4, 5)
    assert not (ids == 0).any()
    for row in range(4):
        assert not set(ids[row].tolist()) & set(h[row].tolist())
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_bad_configuration():
    with pytest.raises(ValueError, match="loss: expected one of"):
        SASRecConfig(num_items=5, loss="hinge")
    with pytest.raises(ValueError, match="hidden: expected a multiple of heads"):
        SASRecConfig(num_items=5, hidden=50, heads=3)
    with pytest.raises(ValueError, match="histories: expected at most max_len=12"):
        model()(torch.ones(1, 13, dtype=torch.long))
    h = histories()
    with pytest.raises(ValueError, match="negatives: the bce loss needs \\(ids, log_q\\) from sample_negatives"):
        model().loss(h, h)
    with pytest.raises(ValueError, match="negatives: the gbce loss needs .* got Tensor"):
        model(loss="gbce").loss(h, h, torch.ones(*h.shape, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="negatives: full_softmax scores every item"):
        model(loss="full_softmax").loss(h, h, (h, h))
