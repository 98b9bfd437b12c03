"""Ranking metrics and the two evaluation protocols.

- "sampled" (the paper's): the target is ranked among 100 items drawn uniformly from
  those the user never interacted with (seeded);
- "full": the target is ranked among all items, the user's earlier items masked (except
  the target itself, which may be a repeat).
A rank is the number of candidates scored strictly above the target (0 = top).
"""

from __future__ import annotations

import torch

from .data.packed import PackedBatch

KS = (1, 5, 10, 20)
PROTOCOLS = ("sampled", "full")
NUM_SAMPLED_NEGATIVES = 100


def ranking_metrics(ranks: torch.Tensor, ks=KS) -> dict[str, float]:
    """HR@k, NDCG@k for each k and MRR from 0-based ranks [E], computed where the ranks are
    and read on the host once."""
    ranks = ranks.double()
    names, values = [], []
    for k in ks:
        hit = (ranks < k).double()
        names += [f"HR@{k}", f"NDCG@{k}"]
        values += [hit.mean(), (hit / torch.log2(ranks + 2)).mean()]
    names.append("MRR")
    values.append((1.0 / (ranks + 1)).mean())
    return dict(zip(names, torch.stack(values).tolist()))


def _to(device: torch.device, value):
    """A host tensor or PackedBatch on `device`: to a GPU from pinned memory, without waiting
    (a pageable copy would wait for the device); on its own device, as it is."""
    if device.type == "cuda":
        return value.pin_memory().to(device, non_blocking=True)
    return value if value.device == device else value.to(device)


@torch.no_grad()
def evaluate(model, split, stage: str, protocol: str, batch_size: int = 512, seed: int = 0) -> dict[str, float]:
    """Metrics of `model` on the "valid" or "test" targets of a LeaveOneOutSplit. The
    histories go to model.score() ("sampled") or model.target_ranks() ("full") packed (a
    PackedBatch): work on real tokens only."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = split.data
    keys = data.interaction_keys() if protocol == "sampled" else None
    generator = torch.Generator(device=data.items.device).manual_seed(seed)
    ranks = []
    for users in split.eval_users.split(batch_size):
        histories, targets = split.evaluation_batch(users, model.config.max_len, stage)
        packed = _to(device, PackedBatch.from_padded(histories, max_len=model.config.max_len))  # real tokens only
        targets = _to(device, targets)
        if protocol == "sampled":
            negatives = data.sample_unseen(users, (NUM_SAMPLED_NEGATIVES,), generator=generator, keys=keys)
            candidates = torch.cat([targets[:, None], _to(device, negatives)], dim=1)  # target first
            scores = model.score(packed, candidates).float()
            ranks.append((scores[:, 1:] > scores[:, :1]).sum(1))
        else:
            ends = split.train_lengths[users] + (1 if stage == "test" else 0)
            seen = _to(device, data.windows(users, ends, int(ends.max())))  # [B, W] every earlier item, 0 = padding
            ranks.append(model.target_ranks(packed, targets, exclude=seen))  # streamed: no [B, N + 1] scores
    model.train(was_training)
    return ranking_metrics(torch.cat(ranks))  # the ranks stay on the device: one read per evaluation
