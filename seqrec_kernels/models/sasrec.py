"""SASRec (Kang & McAuley, ICDM 2018) on the package's ops.

Faithful to the authors' code by default: item embeddings scaled by sqrt(d) plus learned
absolute positions, embedding dropout; each block is causal self-attention whose queries
are layer-normed and keys/values are not (the normed queries are the residual), then a
point-wise feed-forward network on the layer-normed result with its own residual;
padding is zeroed after every block; a final layer norm; the item table is shared by
input and output. `norm_first=True` is the pre-LN variant. Histories are left-padded
[B, L], or packed end to end (a PackedBatch: the same function on the real tokens only).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import Backend
from ..data.packed import PackedBatch
from ..data.samplers import PopularitySampler, UniformSampler, UnseenSampler
from ..ops.attention import fused_attention, fused_attention_varlen
from ..ops.retrieval import target_ranks, topk_items
from ..ops.softmax_loss import full_softmax_loss, sampled_softmax_loss

Loss = Literal["bce", "sampled_softmax", "full_softmax", "gbce"]
Sampler = Literal["uniform", "popularity"]
LOSSES, SAMPLERS = typing.get_args(Loss), typing.get_args(Sampler)  # the choices, spelled once


@dataclasses.dataclass
class SASRecConfig:
    num_items: int  # ids 1..num_items; 0 is padding
    max_len: int = 50
    hidden: int = 50
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.5
    norm_first: bool = False
    loss: Loss = "bce"
    num_negatives: int = 256  # sampled_softmax: shared per batch; gbce: per position
    sampler: Sampler = "uniform"  # sampled_softmax's negatives
    gbce_t: float = 0.75  # gSASRec's calibration

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden: expected a multiple of heads ({self.heads}), got {self.hidden}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {self.sampler!r}")


Negatives = tuple[torch.Tensor, torch.Tensor] | None  # (ids, log_q) from a sampler; None for full_softmax


def negative_sampler(config: SASRecConfig, data=None, item_counts: torch.Tensor | None = None):
    """The sampler that the config's loss draws its negatives from: items the user never
    interacted with for bce and gbce (as the paper; UnseenSampler of the SequenceDataset
    `data`, or uniform items when data is None), config.sampler for sampled_softmax
    (popularity needs the training `item_counts` [N + 1]), None for full_softmax."""
    if config.loss == "full_softmax":
        return None
    if config.loss in ("bce", "gbce"):
        return UnseenSampler(data) if data is not None else UniformSampler(config.num_items + 1)
    if config.sampler == "popularity":
        if item_counts is None:
            raise ValueError("item_counts: the popularity sampler needs the training counts of each item")
        return PopularitySampler(item_counts, alpha=0.75)
    return UniformSampler(config.num_items + 1)


def sample_negatives(
    config: SASRecConfig, sampler, targets_shape, users=None, device=None, generator=None
) -> Negatives:
    """The negatives SASRec.loss() takes for targets of `targets_shape` ([B, L] padded, [T]
    packed), drawn from `sampler`: [*targets_shape, k] per position for bce (k = 1) and gbce
    (k = num_negatives), [num_negatives] shared by every row for sampled_softmax, None for
    full_softmax. users [targets_shape[0]]: the user of each leading row (UnseenSampler)."""
    if config.loss == "full_softmax":
        return None
    if config.loss == "sampled_softmax":
        return sampler((config.num_negatives,), device=device, generator=generator)
    per_position = 1 if config.loss == "bce" else config.num_negatives
    return sampler((*targets_shape, per_position), device=device, generator=generator, users=users)


class Layout(NamedTuple):
    """Where the sequences of a batch are: padded rows [B, L] with `seq_lens` real tokens at
    the end of each row, or packed tokens [T] with sequence boundaries `cu_seqlens`."""

    seq_lens: torch.Tensor | None = None  # [B]
    cu_seqlens: torch.Tensor | None = None  # [B + 1]
    max_seqlen: int = 0  # packed: a bound on the lengths (the attention-dropout hash uses it)


class SelfAttention(nn.Module):
    """Multi-head causal self-attention (Q, K, V projections as in the authors' code, which
    has no output projection)."""

    def __init__(self, hidden, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, queries, keys, layout: Layout, backend):  # [B, L, d] or [T, d] each
        def split(x):  # [..., d] -> [..., H, d / H], a view
            return x.unflatten(-1, (self.heads, -1))

        q, k, v = split(self.query(queries)), split(self.key(keys)), split(self.value(keys))
        options = dict(dropout_p=self.dropout if self.training else 0.0, backend=backend)
        if layout.cu_seqlens is not None:  # [T, H, d / H]
            out = fused_attention_varlen(q, k, v, layout.cu_seqlens, layout.max_seqlen, **options)
        else:  # [B, L, H, d / H] -> [B, H, L, d / H] views and back
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = fused_attention(q, k, v, seq_lens=layout.seq_lens, padding_side="left", **options).transpose(1, 2)
        return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.attention_norm = nn.LayerNorm(config.hidden, eps=1e-8)
        self.attention = SelfAttention(config.hidden, config.heads, config.dropout)
        self.feed_forward_norm = nn.LayerNorm(config.hidden, eps=1e-8)
        self.feed_forward = nn.Sequential(
            nn.Linear(config.hidden, config.hidden), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden), nn.Dropout(config.dropout),
        )  # fmt: skip

    def forward(self, x, layout: Layout, backend):  # [B, L, d] or [T, d]
        if self.norm_first:  # pre-LN: x + f(norm(x)) twice
            normed = self.attention_norm(x)
            x = x + self.attention(normed, normed, layout, backend)
            return x + self.feed_forward(self.feed_forward_norm(x))
        queries = self.attention_norm(x)
        x = queries + self.attention(queries, x, layout, backend)
        x = self.feed_forward_norm(x)
        return x + self.feed_forward(x)


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        self.backend = self.loss_backend = Backend.AUTO
        self.item_embedding = nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks))
        self.final_norm = nn.LayerNorm(config.hidden, eps=1e-8)
        self.reset_parameters()

    def reset_parameters(self):
        for parameter in self.parameters():
            if parameter.dim() > 1:  # Xavier, as the authors' PyTorch port
                nn.init.xavier_normal_(parameter)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def set_backend(self, backend: str | Backend, *, loss_backend: str | Backend | None = None) -> SASRec:
        """Every fused op of the model (attention, losses, retrieval) runs on `backend`, the
        losses on `loss_backend` where given; the extension has no retrieval kernels, so with
        'cuda' or 'cpp' retrieval runs on 'auto'."""
        self.backend = Backend.parse(backend)
        self.loss_backend = self.backend if loss_backend is None else Backend.parse(loss_backend)
        return self

    def _retrieval_backend(self) -> Backend:
        return Backend.AUTO if self.backend in (Backend.CUDA, Backend.CPP) else self.backend

    def forward(self, histories: torch.Tensor | PackedBatch) -> torch.Tensor:
        """Hidden states of histories: left-padded item ids [B, L] (0 = padding) -> [B, L, d],
        or a PackedBatch -> [T, d], the same function on the real tokens only."""
        if isinstance(histories, PackedBatch):
            return self.forward_packed(histories.items, histories.positions, histories.cu_seqlens)
        length = histories.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"histories: expected at most max_len={self.config.max_len} columns, got {length}")
        real = histories != 0  # [B, L]
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=histories.device)
        return self._encode(histories, positions, real[..., None], Layout(seq_lens=real.sum(1)))

    def forward_packed(self, items: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """forward() on a PackedBatch's tensors: items, positions [T], cu_seqlens [B + 1] -> [T, d].
        Tensors only, so that torch.compile can capture it."""
        layout = Layout(cu_seqlens=cu_seqlens, max_seqlen=self.config.max_len)  # as padded rows of max_len
        return self._encode(items, positions, (items != 0)[:, None], layout)

    def _encode(self, items, positions, real, layout: Layout):
        """items [B, L] or [T]; real: a 0/1 mask broadcasting against the hidden states."""
        x = self.item_embedding(items) * math.sqrt(self.config.hidden) + self.position_embedding(positions)
        x = self.embedding_dropout(x) * real
        for block in self.blocks:
            x = block(x, layout, self.backend) * real
        return self.final_norm(x)

    def loss(
        self,
        histories: torch.Tensor | PackedBatch,
        targets: torch.Tensor | None = None,
        negatives: Negatives = None,
    ):
        """Training loss of next-item prediction on padded histories [B, L] with targets
        [B, L] (0 where no target), or on a PackedBatch with its targets [T]. `negatives`
        come from sample_negatives(): ids [..., k] per position for bce and gbce, shared
        (ids [K], log_q [K]) for sampled_softmax, None for full_softmax."""
        if isinstance(histories, PackedBatch):
            targets = histories.targets if targets is None else targets
        if targets is None:
            raise ValueError("targets: expected the next items ([B, L], or a PackedBatch that holds them), got None")
        return self.loss_from_hidden(self(histories), targets, negatives)

    def loss_from_hidden(self, hidden: torch.Tensor, targets: torch.Tensor, negatives: Negatives = None):
        """loss() from hidden states [B, L, d] or [T, d] already computed (by a DDP wrapper, say)."""
        items = self.item_embedding.weight
        config = self.config
        if config.loss == "full_softmax":
            if negatives is not None:
                raise ValueError("negatives: full_softmax scores every item and takes none; pass None")
            return full_softmax_loss(hidden, items, targets, backend=self.loss_backend)
        if not (isinstance(negatives, tuple) and len(negatives) == 2):
            raise ValueError(
                f"negatives: the {config.loss} loss needs (ids, log_q) from sample_negatives(), "
                f"got {type(negatives).__name__}"
            )
        neg_ids, neg_log_q = negatives
        if config.loss == "sampled_softmax":
            return sampled_softmax_loss(hidden, items, targets, neg_ids, neg_log_q=neg_log_q, backend=self.loss_backend)
        valid = targets != 0
        pos_logits = (hidden * items[targets]).sum(-1)  # [B, L] or [T]
        neg_logits = (hidden[..., None, :] * items[neg_ids]).sum(-1)  # [B, L, k] or [T, k]
        if config.loss == "bce":
            pos_weight = 1.0
        else:  # gSASRec: positive probabilities raised to beta calibrate for k sampled negatives
            alpha = config.num_negatives / (config.num_items - 1)
            pos_weight = alpha * (config.gbce_t * (1 - 1 / alpha) + 1 / alpha)
        per_position = -pos_weight * F.logsigmoid(pos_logits) - F.logsigmoid(-neg_logits).sum(-1)
        return (per_position * valid).sum() / valid.sum().clamp(min=1)

    def last_hidden(self, histories: torch.Tensor | PackedBatch) -> torch.Tensor:
        """[B, d] the hidden state after each history's newest item (what predicts the next)."""
        if not isinstance(histories, PackedBatch):
            return self(histories)[:, -1]  # left padding: the last column is the latest item
        hidden = self(histories)  # [T, d]
        last = histories.last_tokens()  # [B], -1 for an empty history
        empty = histories.cu_seqlens[1:] == histories.cu_seqlens[:-1]
        # What the padded forward gives an empty history: the final norm of a zeroed row.
        empty_state = self.final_norm(hidden.new_zeros(hidden.shape[-1]))
        return torch.where(empty[:, None], empty_state, hidden[last.clamp(min=0)])

    @torch.no_grad()
    def score(self, histories: torch.Tensor | PackedBatch, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the next item after each history (padded [B, L] or packed): [B, N + 1]
        over the catalog (index = item id), or [B, C] for candidate ids [B, C]."""
        last = self.last_hidden(histories)
        if items is None:
            return last @ self.item_embedding.weight.T
        return (last[:, None, :] * self.item_embedding(items)).sum(-1)

    @torch.no_grad()
    def recommend(self, histories: torch.Tensor | PackedBatch, k: int = 10, exclude_seen: bool = True):
        """Top-k next items for each history (padded [B, L] or packed): (ids [B, k], scores [B, k]),
        k at most num_items; never the padding item, nor (exclude_seen) an item of the history.
        Scored by topk_items, without a [B, N + 1] score matrix: past the last candidate, id -1
        and score -inf."""
        seen = None
        if exclude_seen:
            seen = histories
            if isinstance(histories, PackedBatch):  # [B, max_len], 0 = padding; the tail adds item 0 to (0, 0)
                seen = histories.items.new_zeros(histories.num_sequences, self.config.max_len)
                seen.index_put_((histories.rows, histories.positions), histories.items, accumulate=True)
        hidden, k = self.last_hidden(histories), min(k, self.config.num_items)
        scores, ids = topk_items(hidden, self.item_embedding.weight, k, exclude=seen, backend=self._retrieval_backend())
        return ids, scores

    @torch.no_grad()
    def target_ranks(self, histories: torch.Tensor | PackedBatch, targets: torch.Tensor, exclude: torch.Tensor):
        """[B] 0-based ranks of targets [B] among all items after each history (padded [B, L] or
        packed), without the padding item and the items of exclude [B, M] (0 = padding; the
        target itself is always ranked): the number of those scoring strictly higher."""
        return target_ranks(self.last_hidden(histories), self.item_embedding.weight, targets, exclude=exclude,
                            backend=self._retrieval_backend())  # fmt: skip
