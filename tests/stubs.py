"""Stand-in models for evaluation tests."""

from torch import nn

from seqrec_kernels import target_ranks
from seqrec_kernels.data.packed import PackedBatch


class FixedScores(nn.Module):
    """Scores item i by scores[i], whatever the history (a popularity model, for instance)."""

    def __init__(self, scores, max_len=4):
        super().__init__()
        self.item_scores = nn.Parameter(scores.float(), requires_grad=False)
        self.config = type("Config", (), {"max_len": max_len})

    def score(self, histories, items=None):
        batch = histories.num_sequences if isinstance(histories, PackedBatch) else histories.shape[0]
        scores = self.item_scores.expand(batch, -1)
        return scores if items is None else scores.gather(1, items)

    def target_ranks(self, histories, targets, exclude):
        """SASRec.target_ranks: the item scores as 1-d embeddings of items, scored by a hidden state of 1."""
        hidden = self.item_scores.new_ones(targets.shape[0], 1)
        return target_ranks(hidden, self.item_scores[:, None], targets, exclude=exclude)
