"""Loss modules over sampled_softmax_loss / full_softmax_loss: the functional ops'
options as constructor arguments; SampledSoftmaxLoss also holds its negative sampler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from .._checks import INDEX_DTYPES, check_bool, check_choice, check_real, check_tensor
from ..backends import Backend
from ..data.samplers import PopularitySampler, UniformSampler, in_batch_negatives
from ..ops.softmax_loss import REDUCTIONS, full_softmax_loss, sampled_softmax_loss

SAMPLERS = ("uniform", "popularity", "in_batch")
NEGATIVE_LAYOUTS = ("shared", "per_sequence", "per_row")
LOGQ_CORRECTIONS = ("negatives", "all", "none")


def _check_loss_options(temperature, ignore_index, reduction, backend) -> Backend:
    """Checks the options both losses share when the module is built; returns the backend."""
    temperature = check_real("temperature", temperature, low=0.0, high=math.inf)
    if temperature <= 0.0:
        raise ValueError(f"temperature: expected a value > 0, got {temperature}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    return Backend.parse(backend)


class FullSoftmaxLoss(torch.nn.Module):
    """`full_softmax_loss` as a module: exact softmax cross-entropy over the whole catalog
    (all items but `exclude_items`), without materializing the [T, N] logits.

    forward(hidden [T, D] or [B, L, D], item_weight [N, D], targets [T] or [B, L]) -> the
    loss (a float32 scalar, or per row for reduction="none"; with return_lse, also the
    per-row log-sum-exp). Positions whose target is `ignore_index` are skipped.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = 0,
        exclude_items: Sequence[int] = (0,),
        reduction: Literal["mean", "sum", "none"] = "mean",
        backend: str | Backend = "auto",
        return_lse: bool = False,
    ):
        super().__init__()
        self.backend = _check_loss_options(temperature, ignore_index, reduction, backend)
        check_bool("return_lse", return_lse)
        exclude_items = tuple(exclude_items)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in exclude_items):
            raise ValueError(f"exclude_items: expected non-negative item ids, got {list(exclude_items)}")
        self.temperature, self.ignore_index, self.reduction = float(temperature), ignore_index, reduction
        self.exclude_items, self.return_lse = exclude_items, return_lse

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, ignore_index={self.ignore_index}, exclude_items={self.exclude_items}, "
            f"reduction={self.reduction!r}, backend={self.backend.value!r}"
        )

    def forward(self, hidden: torch.Tensor, item_weight: torch.Tensor, targets: torch.Tensor):
        return full_softmax_loss(
            hidden, item_weight, targets, temperature=self.temperature, ignore_index=self.ignore_index,
            exclude_items=self.exclude_items, reduction=self.reduction, backend=self.backend,
            return_lse=self.return_lse,
        )  # fmt: skip


class SampledSoftmaxLoss(torch.nn.Module):
    """`sampled_softmax_loss` with its negative sampler: each forward draws negatives and
    scores every position's positive against them, without materializing [T, K] logits.

    forward(hidden [T, D] or [B, L, D], item_weight [N, D], pos_ids [T] or [B, L]) -> the
    loss (a float32 scalar, or [T] / [B, L] for reduction="none"). Positions whose
    positive is `ignore_index` are skipped.

    sampler:
    - "uniform": `num_negatives` items uniform over the N rows of item_weight except
      `padding_idx`;
    - "popularity": `num_negatives` items with probability proportional to
      item_counts ** alpha (item_counts [N]: training counts per item id);
    - "in_batch": the batch's own non-ignored positives as one shared list
      (`num_negatives` must be None; reads the list's length on the host).
    negatives: "shared" (one list [K] for the batch), "per_sequence" ([B, K], 3-D hidden
    only) or "per_row" (K per position); in_batch is "shared".
    logq_correction: "negatives" subtracts log q (the sampler's probability of drawing
    the item) from the negatives' logits, the importance-sampling correction (as this
    package's SASRec does); "all" subtracts it from the positive's logit too (as
    TensorFlow's sampled_softmax_loss and Yi et al.'s in-batch softmax do); "none" uses the
    raw logits ("all" with the popularity sampler needs a nonzero count for every
    positive, else its log q is -inf). A negative equal to the row's positive leaves the denominator when
    `remove_accidental_hits` (the default).
    generator: a torch.Generator on the loss's device to draw from (torch's default when None).
    """

    def __init__(
        self,
        num_negatives: int | None = None,
        *,
        sampler: Literal["uniform", "popularity", "in_batch"] = "uniform",
        item_counts: torch.Tensor | None = None,
        alpha: float = 1.0,
        padding_idx: int | None = 0,
        negatives: Literal["shared", "per_sequence", "per_row"] = "shared",
        logq_correction: Literal["negatives", "all", "none"] = "negatives",
        remove_accidental_hits: bool = True,
        temperature: float = 1.0,
        ignore_index: int = 0,
        reduction: Literal["mean", "sum", "none"] = "mean",
        backend: str | Backend = "auto",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.backend = _check_loss_options(temperature, ignore_index, reduction, backend)
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("negatives", negatives, NEGATIVE_LAYOUTS)
        check_choice("logq_correction", logq_correction, LOGQ_CORRECTIONS)
        check_bool("remove_accidental_hits", remove_accidental_hits)
        if sampler == "in_batch":
            if num_negatives is not None:
                raise ValueError(
                    f"num_negatives: in-batch negatives are the batch's positives; pass None, got {num_negatives!r}"
                )
            if negatives != "shared":
                raise ValueError(f"negatives: in-batch negatives are one shared list; pass 'shared', got {negatives!r}")
        elif isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives: expected an int >= 1 for sampler={sampler!r}, got {num_negatives!r}")
        if (sampler == "popularity") != (item_counts is not None):
            raise ValueError(
                "item_counts: the popularity sampler needs the training count of each item id ([N]), and only it "
                f"uses them; got sampler={sampler!r} with item_counts {'given' if item_counts is not None else 'None'}"
            )
        if padding_idx is not None and (isinstance(padding_idx, bool) or not isinstance(padding_idx, int)):
            raise TypeError(f"padding_idx: expected None or an int, got {type(padding_idx).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
        self.num_negatives, self.sampler, self.padding_idx = num_negatives, sampler, padding_idx
        self.popularity = PopularitySampler(item_counts, alpha, padding_idx) if sampler == "popularity" else None
        self.negatives, self.logq_correction = negatives, logq_correction
        self.remove_accidental_hits, self.temperature = remove_accidental_hits, float(temperature)
        self.ignore_index, self.reduction, self.generator = ignore_index, reduction, generator

    def extra_repr(self) -> str:
        return (
            f"num_negatives={self.num_negatives}, sampler={self.sampler!r}, negatives={self.negatives!r}, "
            f"logq_correction={self.logq_correction!r}, remove_accidental_hits={self.remove_accidental_hits}, "
            f"temperature={self.temperature}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"backend={self.backend.value!r}"
        )

    def _negative_shape(self, hidden: torch.Tensor) -> tuple[int, ...]:
        if self.negatives == "shared":
            return (self.num_negatives,)
        if self.negatives == "per_sequence":
            if hidden.dim() != 3:
                raise ValueError(
                    f"hidden: negatives='per_sequence' needs [B, L, D] hidden states, got shape {tuple(hidden.shape)}"
                )
            return (hidden.shape[0], self.num_negatives)
        return (*hidden.shape[:-1], self.num_negatives)

    def sample(self, hidden: torch.Tensor, item_weight: torch.Tensor, pos_ids: torch.Tensor):
        """The negatives of one forward and the log q terms it passes: (neg_ids, neg_log_q,
        pos_log_q), the log q tensors None where logq_correction leaves them out."""
        num_items = item_weight.shape[0]
        if self.sampler == "in_batch":
            neg_ids, log_q = in_batch_negatives(pos_ids, self.ignore_index)  # [K], [K]
            pos_log_q = None
            if self.logq_correction == "all":  # the K-th listed positive is the K-th non-ignored row
                pos_log_q = torch.zeros(pos_ids.shape, device=pos_ids.device)
                pos_log_q[pos_ids != self.ignore_index] = log_q
            if neg_ids.numel() == 0:  # every row ignored: one placeholder negative keeps the op's shapes
                neg_ids, log_q = pos_ids.new_zeros(1), torch.zeros(1, device=pos_ids.device)
        else:
            if self.popularity is not None and self.popularity.probs.shape[0] != num_items:
                raise ValueError(
                    f"item_weight: expected N={self.popularity.probs.shape[0]} rows (the length of item_counts), "
                    f"got shape {tuple(item_weight.shape)}"
                )
            draw = self.popularity or UniformSampler(num_items, self.padding_idx)
            neg_ids, log_q = draw(self._negative_shape(hidden), device=hidden.device, generator=self.generator)
            pos_log_q = None
            if self.logq_correction == "all" and self.popularity is None:  # uniform: the same for every item
                pos_log_q = torch.full(pos_ids.shape, -math.log(draw.num_candidates), device=hidden.device)
            elif self.logq_correction == "all":  # ignored rows (which may hold any id) get 0
                valid = (pos_ids >= 0) & (pos_ids < num_items) & (pos_ids != self.ignore_index)
                log_probs = self.popularity.log_probs  # [N] float64, on hidden's device since the draw
                pos_log_q = torch.where(valid, log_probs[pos_ids.clamp(0, num_items - 1)], 0.0).float()
        neg_log_q = None if self.logq_correction == "none" else log_q
        return neg_ids, neg_log_q, pos_log_q

    def forward(self, hidden: torch.Tensor, item_weight: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        check_tensor("hidden", hidden)
        check_tensor("item_weight", item_weight)
        check_tensor("pos_ids", pos_ids, dtypes=INDEX_DTYPES)
        neg_ids, neg_log_q, pos_log_q = self.sample(hidden, item_weight, pos_ids)
        return sampled_softmax_loss(
            hidden, item_weight, pos_ids, neg_ids, pos_log_q=pos_log_q, neg_log_q=neg_log_q,
            remove_accidental_hits=self.remove_accidental_hits, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
        )  # fmt: skip
