"""RecBole's SASRec on the package's kernels: change one import.

    from seqrec_kernels.integrations.recbole import SASRec   # instead of recbole.model.sequential_recommender

`SASRec` subclasses RecBole's SASRec: the same constructor `(config, dataset)`, config
keys (RecBole's SASRec.yaml, picked by the class name), modules and parameter names, so
checkpoints load both ways and RecBole's Trainer, evaluation and `predict` /
`full_sort_predict` work unchanged. What changes:
- attention runs `fused_attention` (causal, right padding from `item_seq_len`, RecBole's
  layout) instead of scores + an additive [B, 1, L, L] mask; no L x L tensor is formed;
- `loss_type: CE` runs `full_softmax_loss` over every item (the padding item included, as
  RecBole's CrossEntropyLoss does) without materializing the [B, N] logits; BPR is RecBole's.
Outputs at the positions RecBole reads (each sequence's last real item) equal RecBole's:
there a query sees only real keys, where RecBole's -10000 mask terms vanish. The optional
config key `seqrec_backend` ("auto", "reference", "triton", "cuda", "cpp"; default "auto")
chooses the backend, as does `model.set_backend(...)`.

Needs RecBole (`pip install "seqrec_kernels[recbole]"`); tested with RecBole 1.2.1, which
needs numpy < 2 (see the extra's pins).
"""

from __future__ import annotations

import torch

# Importing RecBole's sequential models turns on autograd anomaly detection for the whole
# process (recbole/model/sequential_recommender/sine.py), which slows every backward
# several times over; the setting found before the import is restored.
_ANOMALY_DETECTION = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
try:
    from recbole.model.layers import MultiHeadAttention
    from recbole.model.sequential_recommender.sasrec import SASRec as RecBoleSASRec
except ImportError as error:
    raise ImportError(
        f"seqrec_kernels.integrations.recbole needs RecBole ({error}): pip install 'seqrec_kernels[recbole]' "
        "(RecBole 1.2.1 with numpy < 2)"
    ) from error
finally:
    torch.autograd.set_detect_anomaly(*_ANOMALY_DETECTION)

from ..backends import Backend  # noqa: E402
from ..ops.attention import fused_attention  # noqa: E402
from ..ops.softmax_loss import full_softmax_loss  # noqa: E402

__all__ = ["RecBoleSASRec", "SASRec"]


def fused_self_attention(
    layer: MultiHeadAttention, hidden: torch.Tensor, seq_lens: torch.Tensor, backend: Backend
) -> torch.Tensor:
    """RecBole's MultiHeadAttention block (projections, causal attention with dropout on
    the probabilities, output projection, dropout, residual and LayerNorm) on
    fused_attention, with its own parameters. hidden [B, L, d] right-padded to seq_lens [B]."""
    batch, length, _ = hidden.shape

    def split_heads(x):  # [B, L, d] -> [B, H, L, d / H], a view
        return x.view(batch, length, layer.num_attention_heads, layer.attention_head_size).transpose(1, 2)

    context = fused_attention(
        split_heads(layer.query(hidden)), split_heads(layer.key(hidden)), split_heads(layer.value(hidden)),
        causal=True, seq_lens=seq_lens, padding_side="right",
        dropout_p=layer.attn_dropout.p if layer.training else 0.0, backend=backend,
    )  # fmt: skip  # [B, H, L, d / H]
    context = context.transpose(1, 2).reshape(batch, length, layer.all_head_size)  # [B, L, d]
    return layer.LayerNorm(layer.out_dropout(layer.dense(context)) + hidden)


class SASRec(RecBoleSASRec):
    """RecBole's SASRec with fused attention and, for loss_type CE, the fused full softmax
    loss (see the module docstring)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.backend = Backend.parse(config["seqrec_backend"] or "auto")

    def set_backend(self, backend: str | Backend) -> SASRec:
        """Every fused op of the model runs on `backend`."""
        self.backend = Backend.parse(backend)
        return self

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """item_seq [B, L] right-padded ids, item_seq_len [B] -> the hidden state [B, d] at
        each sequence's last item, as RecBole's SASRec.forward."""
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        hidden = self.item_embedding(item_seq) + self.position_embedding(positions)[None]  # [B, L, d]
        hidden = self.dropout(self.LayerNorm(hidden))
        for layer in self.trm_encoder.layer:
            hidden = fused_self_attention(layer.multi_head_attention, hidden, item_seq_len, self.backend)
            hidden = layer.feed_forward(hidden)
        return self.gather_indexes(hidden, item_seq_len - 1)

    def calculate_loss(self, interaction) -> torch.Tensor:
        if self.loss_type != "CE":
            return super().calculate_loss(interaction)
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])  # [B, d]
        return full_softmax_loss(
            seq_output, self.item_embedding.weight, interaction[self.POS_ITEM_ID],
            ignore_index=self.loss_fct.ignore_index, exclude_items=(), backend=self.backend,
        )  # fmt: skip
