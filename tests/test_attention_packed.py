"""The reference's packed form (fused_attention_varlen), which it computes per block of
sequences of similar length, vs its padded form (fused_attention), which
tests/test_attention.py checks against the naive truth: many sequences of varied lengths,
empty ones, a padding tail past cu_seqlens[-1], and dropout with the same mask."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from attention_helpers import pack, padded_token_mask
from seqrec_kernels import fused_attention, fused_attention_varlen


@st.composite
def packed_cases(draw):
    # Mostly short histories with a few long ones, as in recommendation data, and empty ones.
    max_len = draw(st.integers(1, 70))
    lengths = st.one_of(st.just(0), st.integers(1, min(max_len, 9)), st.integers(0, max_len))
    seq_lens = draw(st.lists(lengths, min_size=1, max_size=150))
    return dict(
        seq_lens=seq_lens,
        # L, which is also max_seqlen: equal to the longest sequence or beyond it.
        length=max(1, max(seq_lens) + draw(st.sampled_from([0, 0, 1, 13]))),
        heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([1, 7, 16, 33])),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        padding_side=draw(st.sampled_from(["left", "right"])),
        causal=draw(st.booleans()),
        dropout_p=draw(st.sampled_from([0.0, 0.2, 0.6])),
        tail=draw(st.sampled_from([0, 1, 29])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def outputs_and_grads(fn, inputs, dout, seed):
    """out, LSE and the gradients of q, k, v; the dropout seed is drawn after manual_seed(seed)."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    torch.manual_seed(seed)
    out, lse = fn(*inputs)
    return out, lse, torch.autograd.grad(out, inputs, dout)


@given(case=packed_cases())
def test_packed_reference_matches_padded_reference(case):
    generator = torch.Generator().manual_seed(case["seed"])
    seq_lens = torch.tensor(case["seq_lens"])
    batch, length, dtype = len(case["seq_lens"]), case["length"], case["dtype"]
    q, k, v, dout = (
        torch.randn(batch, case["heads"], length, case["head_dim"], generator=generator, dtype=torch.float64).to(dtype)
        for _ in range(4)
    )
    options = dict(causal=case["causal"], dropout_p=case["dropout_p"], backend="reference", return_lse=True)
    padded = outputs_and_grads(
        lambda q, k, v: fused_attention(q, k, v, seq_lens=seq_lens, padding_side=case["padding_side"], **options),
        (q, k, v), dout, case["seed"],
    )  # fmt: skip

    def packed_with_tail(t):  # [B, H, L, D] -> [T + tail, H, D]: the tokens, then rows of no sequence
        tokens = pack(t, seq_lens, case["padding_side"])
        return torch.cat([tokens, torch.randn(case["tail"], *tokens.shape[1:], generator=generator).to(dtype)])

    cu_seqlens = torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32)
    packed = outputs_and_grads(
        lambda q, k, v: fused_attention_varlen(q, k, v, cu_seqlens, length, **options),
        [packed_with_tail(t) for t in (q, k, v)], packed_with_tail(dout), case["seed"],
    )  # fmt: skip

    num_tokens = int(seq_lens.sum())
    (out, lse, grads), (padded_out, padded_lse, padded_grads) = packed, padded
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (padded_out, *padded_grads)):
        torch.testing.assert_close(ours[:num_tokens], pack(theirs, seq_lens, case["padding_side"]), msg=name)
        assert (ours[num_tokens:] == 0).all(), f"{name}: the tail must be zero"
    padded_lse = pack(padded_lse[..., None], seq_lens, case["padding_side"])[..., 0].T  # [H, T]
    torch.testing.assert_close(lse[:, :num_tokens], padded_lse)
    assert (lse[:, num_tokens:] == -math.inf).all()


def test_packed_dropout_mask_is_the_padded_mask(fresh_seed):
    """Non-causal with v = one-hot positions (D = L): out is the dropped probability matrix
    itself, so its zeros are the mask, which must match the padded form's bit for bit."""
    generator = torch.Generator().manual_seed(fresh_seed)
    lengths = (torch.empty(97).geometric_(0.15, generator=generator) - 1).clamp(max=61).long()
    lengths[::11] = 0
    length, heads = max(1, int(lengths.max())), 2
    q = 0.1 * torch.randn(len(lengths), heads, length, length, generator=generator, dtype=torch.float64)
    v = torch.eye(length, dtype=torch.float64).expand(len(lengths), heads, length, length)
    torch.manual_seed(fresh_seed)
    padded = fused_attention(q, q, v, causal=False, seq_lens=lengths, padding_side="right", dropout_p=0.4,
                             backend="reference")  # fmt: skip
    real = padded_token_mask(lengths, length, "right")  # right padding: row index = position
    torch.manual_seed(fresh_seed)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    packed = fused_attention_varlen(q.transpose(1, 2)[real], q.transpose(1, 2)[real], v.transpose(1, 2)[real],
                                    cu_seqlens, length, causal=False, dropout_p=0.4, backend="reference")  # fmt: skip
    kept = pack(padded, lengths, "right") != 0
    assert torch.equal(packed != 0, kept)
    assert 0.5 < kept.double().sum() / (lengths.double().square().sum() * heads) < 0.7  # keep rate about 1 - p
