"""SASRec (Kang & McAuley, ICDM 2018) on the package's ops.

Faithful to the authors' code by default: item embeddings scaled by sqrt(d) plus learned
absolute positions, embedding dropout; each block is causal self-attention whose queries
are layer-normed and keys/values are not (the normed queries are the residual), then a
point-wise feed-forward network on the layer-normed result with its own residual;
padding is zeroed after every block; a final layer norm; the item table is shared by
input and output. `norm_first=True` is the pre-LN variant. Histories are left-padded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import Backend
from ..data.samplers import PopularitySampler, UniformSampler
from ..ops.attention import fused_attention
from ..ops.softmax_loss import full_softmax_loss, sampled_softmax_loss

LOSSES = ("bce", "sampled_softmax", "full_softmax", "gbce")


@dataclasses.dataclass
class SASRecConfig:
    num_items: int  # ids 1..num_items; 0 is padding
    max_len: int = 50
    hidden: int = 50
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.5
    norm_first: bool = False
    loss: Literal["bce", "sampled_softmax", "full_softmax", "gbce"] = "bce"
    num_negatives: int = 256  # sampled_softmax: shared per batch; gbce: per position
    sampler: Literal["uniform", "popularity"] = "uniform"  # sampled_softmax's negatives
    gbce_t: float = 0.75  # gSASRec's calibration

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden: expected a multiple of heads ({self.heads}), got {self.hidden}")
        if self.sampler not in ("uniform", "popularity"):
            raise ValueError(f"sampler: expected 'uniform' or 'popularity', got {self.sampler!r}")


class SelfAttention(nn.Module):
    """Multi-head causal self-attention over left-padded rows (Q, K, V projections as in
    the authors' code, which has no output projection)."""

    def __init__(self, hidden, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def forward(self, queries, keys, seq_lens, backend):  # [B, L, d] each
        batch, length, hidden = queries.shape

        def split(x):  # [B, L, d] -> [B, H, L, d / H], a view
            return x.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)

        out = fused_attention(
            split(self.query(queries)), split(self.key(keys)), split(self.value(keys)),
            seq_lens=seq_lens, padding_side="left", dropout_p=self.dropout if self.training else 0.0,
            backend=backend,
        )  # fmt: skip
        return out.transpose(1, 2).reshape(batch, length, hidden)


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

    def forward(self, x, seq_lens, backend):
        if self.norm_first:  # pre-LN: x + f(norm(x)) twice
            normed = self.attention_norm(x)
            x = x + self.attention(normed, normed, seq_lens, backend)
            return x + self.feed_forward(self.feed_forward_norm(x))
        queries = self.attention_norm(x)
        x = queries + self.attention(queries, x, seq_lens, backend)
        x = self.feed_forward_norm(x)
        return x + self.feed_forward(x)


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig, item_counts: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.backend = Backend.AUTO
        self.item_embedding = nn.Embedding(config.num_items + 1, config.hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks))
        self.final_norm = nn.LayerNorm(config.hidden, eps=1e-8)
        if config.sampler == "popularity":
            if item_counts is None:
                raise ValueError("item_counts: the popularity sampler needs the training counts of each item")
            self.sampler = PopularitySampler(item_counts, alpha=0.75)
        else:
            self.sampler = UniformSampler(config.num_items + 1)
        self.reset_parameters()

    def reset_parameters(self):
        for parameter in self.parameters():
            if parameter.dim() > 1:  # Xavier, as the authors' PyTorch port
                nn.init.xavier_normal_(parameter)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def set_backend(self, backend: str | Backend) -> SASRec:
        """Every fused op of the model (attention and losses) runs on `backend`."""
        self.backend = Backend.parse(backend)
        return self

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        """histories [B, L] item ids, left-padded with 0 -> hidden states [B, L, d]."""
        length = histories.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"histories: expected at most max_len={self.config.max_len} columns, got {length}")
        real = histories != 0  # [B, L]
        seq_lens = real.sum(1)
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=histories.device)
        x = self.item_embedding(histories) * math.sqrt(self.config.hidden) + self.position_embedding(positions)
        x = self.embedding_dropout(x) * real[..., None]
        for block in self.blocks:
            x = block(x, seq_lens, self.backend) * real[..., None]
        return self.final_norm(x)

    def loss(self, histories: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None = None):
        """Training loss of next-item prediction; targets [B, L] (0 where no target).
        negatives [B, L, k] for bce (k = 1) and gbce (k = num_negatives): the trainer passes
        items the user never interacted with, as the paper does; uniform ids when None."""
        return self.loss_from_hidden(self(histories), targets, negatives)

    def loss_from_hidden(self, hidden: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor | None = None):
        """loss() from hidden states [B, L, d] already computed (by a DDP wrapper, say)."""
        items = self.item_embedding.weight
        config = self.config
        if config.loss == "full_softmax":
            return full_softmax_loss(hidden, items, targets, backend=self.backend)
        if config.loss == "sampled_softmax":
            neg_ids, neg_log_q = self.sampler((config.num_negatives,), device=targets.device)
            return sampled_softmax_loss(hidden, items, targets, neg_ids, neg_log_q=neg_log_q, backend=self.backend)
        valid = targets != 0
        negatives_per_position = self.negatives_per_position()
        neg_ids = negatives
        if neg_ids is None:
            neg_ids = torch.randint(
                1, config.num_items + 1, (*targets.shape, negatives_per_position), device=targets.device
            )
        pos_logits = (hidden * items[targets]).sum(-1)  # [B, L]
        neg_logits = (hidden[..., None, :] * items[neg_ids]).sum(-1)  # [B, L, k]
        if config.loss == "bce":
            pos_weight = 1.0
        else:  # gSASRec: positive probabilities raised to beta calibrate for k sampled negatives
            alpha = negatives_per_position / (config.num_items - 1)
            pos_weight = alpha * (config.gbce_t * (1 - 1 / alpha) + 1 / alpha)
        per_position = -pos_weight * F.logsigmoid(pos_logits) - F.logsigmoid(-neg_logits).sum(-1)
        return (per_position * valid).sum() / valid.sum().clamp(min=1)

    def negatives_per_position(self) -> int:
        """How many negatives per position loss() takes: 1 for bce, num_negatives for gbce, 0 otherwise."""
        return {"bce": 1, "gbce": self.config.num_negatives}.get(self.config.loss, 0)

    @torch.no_grad()
    def score(self, histories: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the next item: [B, N + 1] over the catalog (index = item id), or
        [B, C] for candidate ids [B, C]."""
        last = self(histories)[:, -1]  # left padding: the last column is the latest item
        if items is None:
            return last @ self.item_embedding.weight.T
        return (last[:, None, :] * self.item_embedding(items)).sum(-1)

    @torch.no_grad()
    def recommend(self, histories: torch.Tensor, k: int = 10, exclude_seen: bool = True):
        """Top-k next items for each history [B, L]: (ids [B, k], scores [B, k])."""
        scores = self.score(histories)
        scores[:, 0] = -math.inf  # padding is never recommended
        if exclude_seen:
            scores.scatter_(1, histories, -math.inf)
        top = scores.topk(min(k, self.config.num_items), dim=1)
        return top.indices, top.values
