"""Ranking metrics against hand-computed values, and both evaluation protocols."""

import math

import pytest
import torch

from seqrec_kernels.data.dataset import LeaveOneOutSplit, SequenceDataset
from seqrec_kernels.data.readers import Interactions
from seqrec_kernels.metrics import evaluate, ranking_metrics
from stubs import FixedScores


def test_ranking_metrics_by_hand():
    metrics = ranking_metrics(torch.tensor([0, 1, 5, 20]))
    assert metrics["HR@1"] == 0.25 and metrics["HR@5"] == 0.5 and metrics["HR@10"] == 0.75
    assert metrics["HR@20"] == 0.75
    assert metrics["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert metrics["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 4)
    assert metrics["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 21) / 4)


def test_full_protocol_masks_seen_items_but_not_the_target():
    # One user: 1, 2, 3, 4 -> test target 4 after history 1, 2, 3 (all scored higher).
    split = LeaveOneOutSplit.of(SequenceDataset.from_interactions(Interactions([[1, 2, 3, 4]], 6, "t")))
    scores = torch.tensor([100.0, 9, 8, 7, 1, 0, 5])  # item 6 (5.0) beats the target (1.0)
    metrics = evaluate(FixedScores(scores), split, "test", "full")
    assert metrics["HR@1"] == 0.0 and metrics["HR@5"] == 1.0 and metrics["MRR"] == 0.5  # rank 1
    # A repeated target stays a candidate although seen: item 3 (7.0) outranks it, rank 1.
    repeat = LeaveOneOutSplit.of(SequenceDataset.from_interactions(Interactions([[1, 2, 6, 6]], 6, "t")))
    assert evaluate(FixedScores(scores), repeat, "test", "full")["MRR"] == 0.5


def test_sampled_protocol_ranks_among_unseen_items():
    # 200 items; the user saw 1..4 (4 is the test target). Seen items outrank the target:
    # it ranks first only if none of them is ever drawn.
    split = LeaveOneOutSplit.of(SequenceDataset.from_interactions(Interactions([[1, 2, 3, 4]], 200, "t")))
    scores = torch.arange(201.0)
    scores[1:4] = 1000
    scores[4] = 999
    assert evaluate(FixedScores(scores), split, "test", "sampled", seed=1)["HR@1"] == 1.0
    scores[4] = 0.5  # now every drawn negative beats it: rank 100 of 101
    metrics = evaluate(FixedScores(scores), split, "test", "sampled", seed=1)
    assert metrics["MRR"] == pytest.approx(1 / 101)
    assert metrics == evaluate(FixedScores(scores), split, "test", "sampled", seed=1)  # seeded
