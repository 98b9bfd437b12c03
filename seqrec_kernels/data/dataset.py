"""Leave-one-out split and vectorized batching over per-user sequences.

All of a dataset's interactions live in one flat tensor with per-user offsets (CSR), so a
batch of left-padded windows is a single gather, with no per-user Python loop.
"""

from __future__ import annotations

import dataclasses

import torch

from .readers import Interactions


@dataclasses.dataclass
class SequenceDataset:
    """Per-user sequences in CSR form: user u's items are items[offsets[u]:offsets[u + 1]]."""

    items: torch.Tensor  # [I] int64, ids 1..num_items
    offsets: torch.Tensor  # [U + 1] int64
    num_items: int

    @staticmethod
    def from_interactions(data: Interactions) -> SequenceDataset:
        lengths = torch.tensor([len(s) for s in data.sequences], dtype=torch.int64)
        items = torch.tensor([i for s in data.sequences for i in s], dtype=torch.int64)
        return SequenceDataset(items, torch.nn.functional.pad(lengths.cumsum(0), (1, 0)), data.num_items)

    @property
    def num_users(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()

    def to(self, device) -> SequenceDataset:
        return SequenceDataset(self.items.to(device), self.offsets.to(device), self.num_items)

    def windows(self, users: torch.Tensor, ends: torch.Tensor, max_len: int) -> torch.Tensor:
        """[B, max_len] left-padded windows of each user's items before position `ends`
        (exclusive, relative to the user's first item)."""
        starts = self.offsets[users]
        index = (starts + ends)[:, None] - max_len + torch.arange(max_len, device=users.device)  # [B, L]
        inside = index >= starts[:, None]
        return torch.where(inside, self.items[index.clamp(min=0)], 0)

    def interaction_keys(self) -> torch.Tensor:
        """Sorted user * (num_items + 1) + item keys: membership tests by searchsorted."""
        users = torch.repeat_interleave(torch.arange(self.num_users, device=self.items.device), self.lengths())
        return torch.sort(users * (self.num_items + 1) + self.items).values

    def sample_unseen(self, users, shape, generator=None, keys=None, rounds=20):
        """Uniform item ids in 1..num_items that `users` [B] never interacted with, [B, *shape].
        Rejection sampling; `keys` are this dataset's interaction_keys() (computed if None)."""
        keys = self.interaction_keys() if keys is None else keys
        device = users.device
        user_keys = (users * (self.num_items + 1)).view(-1, *([1] * len(shape)))
        ids = torch.randint(1, self.num_items + 1, (users.numel(), *shape), generator=generator, device=device)
        for _ in range(rounds):
            candidate_keys = user_keys + ids
            position = torch.searchsorted(keys, candidate_keys.reshape(-1)).clamp(max=keys.numel() - 1)
            seen = (keys[position] == candidate_keys.reshape(-1)).view(ids.shape)
            if not seen.any():
                break
            fresh = torch.randint(1, self.num_items + 1, ids.shape, generator=generator, device=device)
            ids = torch.where(seen, fresh, ids)
        return ids


class InsufficientDataError(ValueError):
    """Data too small for the split or for training; the message says what is missing."""


@dataclasses.dataclass
class LeaveOneOutSplit:
    """The paper's split: each user's last item is the test target, the one before it the
    validation target, the rest training; users with fewer than 3 interactions train only."""

    data: SequenceDataset
    train_lengths: torch.Tensor  # [U] items used for training
    eval_users: torch.Tensor  # [E] users with a validation and a test item

    @staticmethod
    def of(data: SequenceDataset) -> LeaveOneOutSplit:
        """Raises InsufficientDataError when no user can be evaluated (all have < 3 items)."""
        lengths = data.lengths()
        evaluated = lengths >= 3
        if not evaluated.any():
            longest = int(lengths.max()) if lengths.numel() else 0
            raise InsufficientDataError(
                f"data: no user has the 3 interactions leave-one-out needs (train, validation, test); "
                f"got {data.num_users} users, longest history {longest}"
            )
        train_lengths = torch.where(evaluated, lengths - 2, lengths)
        return LeaveOneOutSplit(data, train_lengths, evaluated.nonzero().squeeze(1))

    def train_item_counts(self) -> torch.Tensor:
        """[N + 1] how often each item occurs in the training part (for popularity samplers)."""
        lengths = self.data.lengths()
        position = torch.arange(self.data.items.numel()) - self.data.offsets[:-1].repeat_interleave(lengths)
        in_train = position < self.train_lengths.repeat_interleave(lengths)
        return torch.bincount(self.data.items[in_train], minlength=self.data.num_items + 1)

    def training_users(self) -> torch.Tensor:
        """Users with at least one (input, target) pair: two or more training items."""
        return (self.train_lengths >= 2).nonzero().squeeze(1)

    def training_batch(self, users: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [B, max_len]: each input's next item, left-padded; no target
        where the input is padding (the first item is never a target)."""
        ends = self.train_lengths[users]
        inputs = self.data.windows(users, ends - 1, max_len)
        return inputs, torch.where(inputs != 0, self.data.windows(users, ends, max_len), 0)

    def evaluation_batch(self, users: torch.Tensor, max_len: int, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(histories [B, max_len], targets [B]) for "valid" (history = training items) or
        "test" (history = training items + the validation item)."""
        ends = self.train_lengths[users] + (1 if stage == "test" else 0)
        targets = self.data.items[self.data.offsets[users] + ends]
        return self.data.windows(users, ends, max_len), targets
