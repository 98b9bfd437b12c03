"""Packed (jagged) batches: the histories of a batch end to end, without padding.

SASRec's padded batches are mostly padding (on Games, 84% of a [128, 50] training batch),
and every layer outside attention computes those rows and throws them away. A packed
batch holds only the real tokens, [T] instead of [B, L]; attention sees the sequence
boundaries through `cu_seqlens` (fused_attention_varlen). It is built on the host from the
padded windows, so it has the same users, items and positions as the padded batch, and
the model computes the same function on it.

The token count may be padded with a tail of padding tokens (item 0, no target, in no
sequence) up to a multiple of `bucket`, or up to the smallest of a few fixed token counts
(`token_counts`, chosen by token_buckets() from the data's lengths), so that a few shapes
cover an epoch: CUDA graphs and torch.compile need fixed shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

_SIMULATED_BATCHES = 4096  # token_buckets(): random batches whose padding the counts minimize


def token_buckets(
    tokens_per_sequence: torch.Tensor, batch_size: int, count: int = 4, multiple: int = 8, seed: int = 0
) -> tuple[int, ...]:
    """At most `count` token counts, ascending multiples of `multiple`, that every packed batch
    of at most `batch_size` sequences with these token counts [U] fits into: the largest holds
    the batch_size longest sequences together; the others are those that minimize the padding
    of 4,096 random batches, the largest of these among them (so a batch overflows to the
    largest count about once in 4,096). Deterministic for a seed."""
    if tokens_per_sequence.dim() != 1 or tokens_per_sequence.numel() == 0:
        raise ValueError(f"tokens_per_sequence: expected [U] counts, U >= 1, got {tuple(tokens_per_sequence.shape)}")
    for name, value in (("batch_size", batch_size), ("count", count), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    counts = tokens_per_sequence.long()
    longest = counts.topk(min(batch_size, counts.numel())).values.sum().clamp(min=1)
    largest = int(-(-longest // multiple) * multiple)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(counts.numel(), (_SIMULATED_BATCHES, batch_size), generator=generator)
    sizes = (-(-counts[picks].sum(1) // multiple) * multiple).clamp(min=multiple, max=largest)  # [batches]
    values, batches = torch.unique(sizes, return_counts=True)  # ascending
    return tuple(sorted(set(_least_padding(values.tolist(), batches.tolist(), count - 1)) | {largest}))


def _least_padding(values: list[int], weights: list[int], cuts: int) -> list[int]:
    """At most `cuts` of `values` (ascending; weights[i] batches have values[i] tokens), the
    last among them, that minimize the total tokens when each batch is padded to the smallest
    chosen value that holds it (dynamic programming over the cut positions)."""
    if cuts < 1:
        return []
    n, prefix = len(values), [0]
    for weight in weights:
        prefix.append(prefix[-1] + weight)
    # cost[j][i]: the least total of the batches of values[:i + 1] with j + 1 cuts, the last at i.
    cost = [[values[i] * prefix[i + 1] for i in range(n)]]
    previous = [[-1] * n]
    for _ in range(1, cuts):
        row, back = [], []
        for i in range(n):
            options = [(cost[-1][a] + values[i] * (prefix[i + 1] - prefix[a + 1]), a) for a in range(i)]
            best = min(options, default=(cost[-1][i], previous[-1][i]))  # i == 0: no earlier cut
            row.append(best[0])
            back.append(best[1] if options else -1)
        cost.append(row)
        previous.append(back)
    chosen, i, j = [], n - 1, len(cost) - 1
    while i >= 0:
        chosen.append(values[i])
        i, j = previous[j][i], max(j - 1, 0)
    return chosen


@dataclasses.dataclass
class PackedBatch:
    """B histories end to end: sequence b is tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1,
    oldest first; tokens from cu_seqlens[-1] to T are the padding tail."""

    items: torch.Tensor  # [T] int64 item ids, 0 on the tail
    positions: torch.Tensor  # [T] int64 SASRec position: max_len - 1 for a history's newest item
    cu_seqlens: torch.Tensor  # [B + 1] int32 offsets; cu_seqlens[-1] = real tokens <= T
    rows: torch.Tensor  # [T] int64 the batch row (sequence) of each token, 0 on the tail
    targets: torch.Tensor | None = None  # [T] int64 next item of each token, 0 where none (tail)

    @staticmethod
    def from_padded(
        histories: torch.Tensor,
        targets: torch.Tensor | None = None,
        max_len: int | None = None,
        bucket: int = 1,
        token_counts: Sequence[int] | None = None,
    ) -> PackedBatch:
        """Packs left-padded histories [B, L] (0 = padding) and their targets [B, L]. A
        history's positions are those the padded forward gives it: column + max_len - L
        (max_len defaults to L). At least one token, so that T > 0 even for empty rows; T is
        rounded up to a multiple of `bucket`, or is the smallest of `token_counts` that holds
        the real tokens (a ValueError if none does). Reads the token count: build it on the
        host (CPU tensors), not from device tensors."""
        if histories.dim() != 2:
            raise ValueError(f"histories: expected [B, L] item ids, got shape {tuple(histories.shape)}")
        if targets is not None and targets.shape != histories.shape:
            raise ValueError(
                f"targets: expected the shape of histories {tuple(histories.shape)}, got {tuple(targets.shape)}"
            )
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"bucket: expected an int >= 1, got {bucket!r}")
        batch, length = histories.shape
        max_len = length if max_len is None else max_len
        if length > max_len:
            raise ValueError(f"histories: expected at most max_len={max_len} columns, got {length}")
        real = histories != 0  # [B, L]
        lengths = real.sum(1)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        rows, columns = real.nonzero(as_tuple=True)  # row-major: each history in order, oldest first
        num_real = rows.numel()
        num_tokens = -(-max(num_real, 1) // bucket) * bucket  # rounded up to the bucket
        if token_counts is not None:
            fitting = [n for n in token_counts if n >= max(num_real, 1)]
            if bucket != 1 or not fitting:
                raise ValueError(
                    f"token_counts: expected a count >= the batch's {num_real} tokens (and bucket=1), "
                    f"got {list(token_counts)} with bucket={bucket}"
                )
            num_tokens = min(fitting)
        tail = num_tokens - num_real

        def with_tail(values):  # [num_real] -> [T], zeros on the tail
            return torch.cat([values, values.new_zeros(tail)])

        return PackedBatch(
            items=with_tail(histories[rows, columns]),
            positions=with_tail(columns + (max_len - length)),
            cu_seqlens=cu_seqlens,
            rows=with_tail(rows),
            targets=None if targets is None else with_tail(targets[rows, columns]),
        )

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        """T, the tail included."""
        return self.items.numel()

    @property
    def device(self) -> torch.device:
        return self.items.device

    def last_tokens(self) -> torch.Tensor:
        """[B] index of each history's newest token (-1 for an empty history)."""
        return self.cu_seqlens[1:].long() - 1

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """The batch on `device`. With non_blocking=True from pinned memory (pin_memory()),
        the copy does not wait for the device."""
        return PackedBatch(**{
            f.name: None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
        })  # fmt: skip

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(**{
            f.name: None if (t := getattr(self, f.name)) is None else t.pin_memory() for f in dataclasses.fields(self)
        })  # fmt: skip
