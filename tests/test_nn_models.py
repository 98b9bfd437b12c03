"""Existing models on the kernels through `replace_attention`: a SASRec written the way
the popular PyTorch ports write it, and nn.TransformerEncoderLayer with padding masks and
is_causal, against torch's own modules in float64 (the truth) and float32 (the baseline
of the tolerance rule), on every backend; and the port training after the swap."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqrec_kernels.nn.attention as nn_attention
from attention_helpers import assert_flash_rule
from backends_under_test import ALL
from seqrec_kernels.nn import MultiheadAttention, replace_attention


class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden, dropout):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(hidden, hidden, 1), nn.Conv1d(hidden, hidden, 1)
        self.dropout1, self.dropout2, self.relu = nn.Dropout(dropout), nn.Dropout(dropout), nn.ReLU()

    def forward(self, inputs):  # [B, L, d]
        outputs = self.dropout2(self.conv2(self.relu(self.dropout1(self.conv1(inputs.transpose(-1, -2))))))
        return outputs.transpose(-1, -2) + inputs


class PortedSASRec(nn.Module):
    """SASRec as the popular PyTorch port (pmixer/SASRec.pytorch) writes it:
    nn.MultiheadAttention called sequence-first with a boolean causal attn_mask (True
    above the diagonal) built on every forward, the default need_weights (weights
    discarded), layer-normed queries over un-normed keys, no key_padding_mask (padding
    is zeroed after each block)."""

    def __init__(self, num_items, max_len, hidden, heads, blocks, dropout):
        super().__init__()
        self.hidden = hidden
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.attention_layernorms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.attention_layers = nn.ModuleList(nn.MultiheadAttention(hidden, heads, dropout) for _ in range(blocks))
        self.forward_layernorms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(blocks))
        self.forward_layers = nn.ModuleList(PointWiseFeedForward(hidden, dropout) for _ in range(blocks))
        self.last_layernorm = nn.LayerNorm(hidden, eps=1e-8)

    def log2feats(self, log_seqs):  # [B, L] left-padded ids -> [B, L, d]
        seqs = self.item_emb(log_seqs) * self.hidden**0.5
        seqs = seqs + self.pos_emb(torch.arange(log_seqs.shape[1], device=log_seqs.device))[None]
        seqs = self.emb_dropout(seqs)
        timeline_mask = log_seqs == 0
        seqs = seqs * ~timeline_mask.unsqueeze(-1)
        length = seqs.shape[1]
        attention_mask = ~torch.tril(torch.ones((length, length), dtype=torch.bool, device=log_seqs.device))
        for attention_norm, attention, forward_norm, forward in zip(
            self.attention_layernorms, self.attention_layers, self.forward_layernorms, self.forward_layers
        ):
            seqs = seqs.transpose(0, 1)  # [L, B, d]
            queries = attention_norm(seqs)
            mha_outputs, _ = attention(queries, seqs, seqs, attn_mask=attention_mask)
            seqs = (queries + mha_outputs).transpose(0, 1)  # [B, L, d]
            seqs = forward(forward_norm(seqs)) * ~timeline_mask.unsqueeze(-1)
        return self.last_layernorm(seqs)

    def forward(self, log_seqs, pos_seqs, neg_seqs):  # -> logits [B, L] of positives and negatives
        feats = self.log2feats(log_seqs)
        return (feats * self.item_emb(pos_seqs)).sum(-1), (feats * self.item_emb(neg_seqs)).sum(-1)


def left_padded_histories(batch, length, num_items):
    """[B, L] ids in 1..num_items, left-padded with 0 to random lengths including 0 and L."""
    lengths = torch.randint(0, length + 1, (batch,))
    lengths[:2] = torch.tensor([0, length])
    ids = torch.randint(1, num_items + 1, (batch, length))
    return torch.where(torch.arange(length)[None] >= length - lengths[:, None], ids, 0)


def outputs_and_grads(model, run, dout):
    """run(model) -> the compared output rows; returns them and every parameter's gradient
    of <output, dout>."""
    model.zero_grad(set_to_none=True)
    out = run(model)
    (out * dout.to(out.dtype)).sum().backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def check_against_torch(torch_model, run, backend, expected_replaced):
    """The model after replace_attention vs the float64 torch model (truth) by the
    tolerance rule, the float32 torch model being the baseline: outputs and every
    parameter's gradient. Also checks that the kernels ran."""
    truth_model, ours = copy.deepcopy(torch_model).double(), copy.deepcopy(torch_model)
    assert replace_attention(ours, backend=backend) == expected_replaced
    out_shape = run(torch_model).shape
    dout = torch.randn(out_shape, dtype=torch.float64)
    base_out, base_grads = outputs_and_grads(torch_model, run, dout)
    truth_out, truth_grads = outputs_and_grads(truth_model, run, dout)
    calls = []
    fused = nn_attention.fused_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["backend"])
        return fused(*args, **kwargs)

    nn_attention.fused_attention = counted
    try:
        out, grads = outputs_and_grads(ours, run, dout)
    finally:
        nn_attention.fused_attention = fused
    assert calls and all(b.value == backend for b in calls), "the drop-in must run the fused kernels"
    assert out.dtype == torch.float32
    assert_flash_rule("output", out, truth_out, base_out, torch.float32, 2)
    assert grads.keys() == truth_grads.keys()
    for name, grad in grads.items():
        assert_flash_rule(f"d {name}", grad, truth_grads[name], base_grads[name], torch.float32, 3)


@pytest.mark.parametrize("backend", ALL)
def test_ported_sasrec_matches_torch(backend):
    """Eval mode, float32: same logits and gradients after replace_attention (head dim 25
    over 2 heads; a history of length 0 and one of length L)."""
    num_items, length = 30, 6
    model = PortedSASRec(num_items, length, hidden=50, heads=2, blocks=2, dropout=0.2).eval()
    histories = left_padded_histories(4, length, num_items)
    pos, neg = torch.randint(1, num_items + 1, (2, 4, length))

    def run(m):
        return torch.cat(m(histories, pos, neg))  # [2B, L]

    check_against_torch(model, run, backend, expected_replaced=2)


@pytest.mark.parametrize("backend", ALL)
def test_ported_sasrec_trains(backend):
    """An Adam optimizer built before the swap keeps training the same parameters: a few
    steps in training mode (attention dropout on) lower the port's BCE loss on the batch
    (measured in eval mode, free of dropout noise)."""
    num_items, length = 30, 6
    model = PortedSASRec(num_items, length, hidden=16, heads=1, blocks=2, dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    assert replace_attention(model, backend=backend) == 2
    assert all(isinstance(m, MultiheadAttention) and m.training for m in model.attention_layers)
    in_proj_before = model.attention_layers[0].in_proj_weight.detach().clone()
    histories = left_padded_histories(4, length, num_items)
    pos = torch.where(histories > 0, torch.randint(1, num_items + 1, histories.shape), 0)
    neg = torch.randint(1, num_items + 1, histories.shape)
    real = pos != 0

    def bce_loss():
        pos_logits, neg_logits = model(histories, pos, neg)
        return F.binary_cross_entropy_with_logits(
            torch.cat([pos_logits[real], neg_logits[real]]),
            torch.cat([torch.ones_like(pos_logits[real]), torch.zeros_like(neg_logits[real])]),
        )

    def eval_loss():
        model.eval()
        with torch.no_grad():
            loss = bce_loss()
        model.train()
        return loss

    before = eval_loss()
    for _ in range(4):
        loss = bce_loss()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert eval_loss() < before
    assert not torch.equal(model.attention_layers[0].in_proj_weight, in_proj_before)


def padding_mask(lengths, length, side):
    """[B, L] bool, True at padding."""
    index = torch.arange(length)[None]
    return index < length - lengths[:, None] if side == "left" else index >= lengths[:, None]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    ("side", "causal", "batch_first"),
    [("left", True, True), ("right", True, False), ("right", False, True), ("left", False, False)],
)
def test_transformer_encoder_layer_matches_torch(backend, side, causal, batch_first):
    """nn.TransformerEncoderLayer (self_attn called with key_padding_mask, need_weights=False
    and is_causal): same outputs at real tokens and same gradients of them. Rows at
    padding positions are not compared (the drop-in's padding rows are defined
    differently; see MultiheadAttention's docstring)."""
    batch, length, hidden = 3, 5, 16
    layer = nn.TransformerEncoderLayer(hidden, 2, dim_feedforward=32, dropout=0.1, batch_first=batch_first).eval()
    lengths = torch.tensor([length, 2, 1])
    pad = padding_mask(lengths, length, side)  # [B, L]
    x = torch.randn(batch, length, hidden, dtype=torch.float64)
    mask = torch.ones(length, length, dtype=torch.bool).triu(1) if causal else None

    def run(m):
        dtype = next(m.parameters()).dtype
        src = x.to(dtype) if batch_first else x.to(dtype).transpose(0, 1)
        out = m(src, src_mask=mask, src_key_padding_mask=pad, is_causal=causal)
        out = out if batch_first else out.transpose(0, 1)  # [B, L, d]
        return out[~pad]  # [real tokens, d]

    check_against_torch(layer, run, backend, expected_replaced=1)
