"""The naive attention the tests trust, and the one helper that checks a backend against it.

`naive_attention` is written from the semantics alone (explicit index comparisons, a
plain masked softmax) and is autograd-differentiated; run in float64 it is the truth,
run in a low-precision dtype it is the baseline of the FlashAttention tolerance rule.
"""

import math

import torch

from seqrec_kernels import fused_attention, fused_attention_varlen
from seqrec_kernels.reference.dropout import keep_mask, row_hash

# The tolerance rule (FlashAttention's): the kernel's max error against the float64 truth
# is at most 2x (3x for gradients) the error of the same math done naively in the same
# dtype, plus a floor of FLOOR_ULPS units in the last place of the true values' scale: the
# largest sum of the absolute values of the terms an output element sums (term_bounds;
# without cancellation, the truth's largest magnitude). The floor keeps the rule meaningful
# on tiny tensors where the naive error is luck; in float64 the naive computation is the
# truth itself, so the floor is the whole budget.
FLOOR_ULPS = {torch.float64: 1024, torch.float32: 16, torch.float16: 2, torch.bfloat16: 2}


def padded_token_mask(seq_lens, length, padding_side):
    """[B, L] bool: which slots hold real tokens."""
    index = torch.arange(length, device=seq_lens.device)[None, :]
    if padding_side == "left":
        return index >= length - seq_lens[:, None]
    return index < seq_lens[:, None]


def dropout_keep(seed, seq_lens, num_heads, length, padding_side, dropout_p):
    """[B, H, L, L] keep mask the kernels must use: hash of (seq, head, position, position)."""
    batch = seq_lens.shape[0]
    first = (length - seq_lens) if padding_side == "left" else torch.zeros_like(seq_lens)
    position = torch.arange(length, device=seq_lens.device)[None, :] - first[:, None]  # [B, L]
    arange = lambda n: torch.arange(n, device=seq_lens.device)  # noqa: E731
    seq_head = arange(batch)[:, None] * num_heads + arange(num_heads)[None, :]  # [B, H]
    row_key = seq_head[:, :, None] * length + position[:, None, :].clamp(min=0)
    return keep_mask(row_hash(seed, row_key)[..., None], position[:, None, None, :], dropout_p)


def naive_probs(q, k, seq_lens, padding_side, causal, scale):
    """[B, H, L, L] softmax of the visible scores in q.dtype (rows that see nothing: 0)."""
    length = q.shape[2]
    real = padded_token_mask(seq_lens, length, padding_side)  # [B, L]
    i = torch.arange(length, device=q.device)[:, None]
    j = torch.arange(length, device=q.device)[None, :]
    visible = real[:, :, None] & real[:, None, :]  # [B, L, L]
    if causal:
        visible = visible & (j <= i)
    visible = visible[:, None]  # [B, 1, L, L]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, -math.inf)
    sees_any = visible.any(-1, keepdim=True)
    scores = torch.where(sees_any, scores, 0.0)  # rows that see nothing: avoid NaN
    return torch.where(visible, torch.softmax(scores, dim=-1), 0.0)


def naive_attention(q, k, v, seq_lens, padding_side, causal, scale, keep=None, dropout_p=0.0):
    """Computed entirely in q.dtype. q/k/v [B, H, L, D]; keep [B, H, L, L] or None."""
    probs = naive_probs(q, k, seq_lens, padding_side, causal, scale)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ v


def term_bounds(q, k, v, dout, seq_lens, padding_side, causal, scale, keep=None, dropout_p=0.0):
    """{out, dq, dk, dv}: the largest sum of the magnitudes of the rounded terms an element
    of each output sums, in float64: the scale its rounding error is relative to.
    out and dv sum probabilities times v or dout; dq and dk sum dS = P (dP - delta), whose
    rounding comes from delta = rowsum(dout * out) with out rounded to the input dtype (as
    FlashAttention's backward does): it does not cancel where dS does (dq of a one-key row,
    0 in the truth). dv's probabilities are recomputed from the rounded LSE."""
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The backward recomputes P = exp(S - LSE) from the LSE rounded to lse_dtype: each
    # probability is off by eps(lse_dtype) x |LSE| relative, however large the logits.
    lse = naive_lse(q, k, seq_lens, padding_side, causal, scale)
    largest_lse = lse[lse > -math.inf].abs().max().item() if (lse > -math.inf).any() else 0.0
    recompute = 1.0 + torch.finfo(lse_dtype).eps / torch.finfo(q.dtype).eps * largest_lse
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))
    probs = naive_probs(q, k, seq_lens, padding_side, causal, scale)  # [B, H, L, L]
    dropped = probs if keep is None else probs * keep / (1.0 - dropout_p)
    abs_out = dropped @ v.abs()  # [B, H, L, D]
    # delta's rounding: independent errors of its D products add in quadrature.
    abs_delta = (dout * (dropped @ v)).square().sum(-1, keepdim=True).sqrt()  # [B, H, L, 1]
    sums = {
        "out": abs_out,
        "dq": scale * (probs * abs_delta) @ k.abs(),
        "dk": scale * (probs * abs_delta).transpose(-1, -2) @ q.abs(),
        "dv": recompute * dropped.transpose(-1, -2) @ dout.abs(),
    }
    return {name: t.max().item() if t.numel() else 0.0 for name, t in sums.items()}


def make_qkv(batch, heads, length, head_dim, dtype, strided=False, generator=None):
    """Random q, k, v [B, H, L, D] needing grad; strided: transposed views of [B, L, H, D]."""

    def one():
        if strided:
            t = torch.randn(batch, length, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype)
        return t.requires_grad_()

    return one(), one(), one()


def _max_error(actual, truth):
    return (actual.double() - truth.double()).abs().max().item() if truth.numel() else 0.0


def _forward_and_grads(fn, inputs, dout):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = (
        torch.autograd.grad(out, inputs, dout.to(out.dtype)) if out.numel() else [torch.zeros_like(t) for t in inputs]
    )
    return out.detach(), [g.detach() for g in grads]


def assert_flash_rule(name, actual, truth, baseline, dtype, factor, floor_scale=1.0, scale=None):
    """Error vs truth <= factor x the naive same-dtype error + FLOOR_ULPS ulps of the larger of
    `scale` (the output's term bound) and the truth's largest magnitude, x floor_scale; nothing NaN. A rule that would
    accept a zero result where the truth is well above the floor is an error of the test
    (a baseline that is itself meaningless, a floor too wide), not a pass."""
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    err, base = _max_error(actual, truth), _max_error(baseline, truth)
    largest = truth.abs().max().item() if truth.numel() else 0.0
    ulps = FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * max(largest, scale or 0.0)
    floor = ulps * floor_scale
    limit = factor * base + floor
    # Exempt: a truth within rounding of its scale (terms that cancel), or a million times below
    # the naive computation's own error (a gradient that is 0 up to rounding, e.g. a key bias's
    # under softmax), where zero is right.
    assert limit < largest / 4 or largest <= 4 * ulps or largest <= 1e-6 * base, (
        f"{name}: the rule allows {limit:.3g} against a truth of largest magnitude {largest:.3g}: it would "
        f"accept zeros ({factor} x naive {base:.3g}, floor {floor:.3g})"
    )
    if largest <= 1e-6 * base:
        # A truth that is 0 up to rounding: both results are rounding noise of the same cancelling
        # sum taken in different orders, and noise over noise spreads wider than `factor` (RecBole's
        # key-bias gradient, C++ vs naive float32: median 1.8x, largest 4.1x over 60 seeds). A real
        # error sits orders of magnitude above 10x the noise.
        limit = max(limit, 10 * base)
    assert err <= limit, (
        f"{name}: max error {err:.3g} > limit {limit:.3g} ({factor} x naive {base:.3g} + floor {floor:.3g})"
    )


def _rng_state(device):
    """The state of torch's default generator on `device`, where fused_attention draws its seed."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device, state):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def naive_lse(q, k, seq_lens, padding_side, causal, scale):
    """[B, H, L] float64 row log-sum-exp of the visible scores (-inf where none)."""
    length = q.shape[2]
    real = padded_token_mask(seq_lens, length, padding_side)
    visible = real[:, :, None] & real[:, None, :]
    if causal:
        visible = visible & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.logsumexp(scores.masked_fill(~visible[:, None], -math.inf), dim=-1)


def pack(t, seq_lens, padding_side):
    """[B, H, L, ...] padded -> [T, H, ...] packed: the real tokens only, in order."""
    real = padded_token_mask(seq_lens, t.shape[2], padding_side)
    return t.transpose(1, 2)[real]


def check_against_truth(
    q, k, v, seq_lens, padding_side, causal, backend, dropout_p=0.0, varlen=False, tail=0, floor_scale=1.0,
    out_floor_scale=1.0,
):  # fmt: skip
    """Forward, LSE and the three gradients of `backend` vs naive float64 with the same
    dropout mask, by the FlashAttention rule. varlen: runs fused_attention_varlen on the
    packed real tokens followed by `tail` rows of noise past cu_seqlens[-1], compares the
    real rows with the padded truth and checks that the tail is padding (zero out and
    gradients, -inf LSE). floor_scale widens the floor of out and the gradients where the
    inputs make it necessary, out_floor_scale that of out alone (large scores: a score's
    float32 rounding, relative to its magnitude, moves every probability, so one summation
    order differs from another by that much)."""
    assert varlen or not tail, "only the packed form has a tail"
    batch, heads, length, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    rng_state = _rng_state(q.device)
    seed = torch.randint(2**31 - 1, (1,), device=q.device)  # the draw fused_attention makes for its seed
    keep = dropout_keep(seed, seq_lens, heads, length, padding_side, dropout_p) if dropout_p else None
    dout = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    cu_seqlens = torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32)
    options = dict(causal=causal, dropout_p=dropout_p, backend=backend, return_lse=True)
    lse = {}

    def ours(q, k, v):
        _set_rng_state(q.device, rng_state)
        if varlen:
            out, lse["ours"] = fused_attention_varlen(q, k, v, cu_seqlens, length, **options)
        else:
            out, lse["ours"] = fused_attention(q, k, v, seq_lens=seq_lens, padding_side=padding_side, **options)
        return out

    def naive(q, k, v):
        return naive_attention(q, k, v, seq_lens, padding_side, causal, scale, keep, dropout_p)

    def layout(t):  # the rows of `ours` that hold tokens, from a padded [B, H, L, ...] tensor
        return pack(t, seq_lens, padding_side) if varlen else t

    def with_tail(t):  # what `ours` takes: the packed tokens, then `tail` rows of no sequence
        noise = torch.randn(tail, *t.shape[1:], dtype=torch.float64, device=t.device).to(t.dtype)
        return torch.cat([t, noise]) if varlen else t

    num_tokens = int(seq_lens.sum())
    inputs = [with_tail(layout(t.detach())) for t in (q, k, v)]
    out, grads = _forward_and_grads(ours, inputs, with_tail(layout(dout)))
    assert out.dtype == q.dtype and out.shape == inputs[0].shape
    if varlen:
        for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
            assert (t[num_tokens:] == 0).all(), f"{name}: the tail past cu_seqlens[-1] must be zero"
        assert (lse["ours"][:, num_tokens:] == -math.inf).all(), "LSE must be -inf on the tail"
        out, grads, lse["ours"] = out[:num_tokens], [g[:num_tokens] for g in grads], lse["ours"][:, :num_tokens]
    truth_out, truth_grads = _forward_and_grads(naive, [t.double() for t in (q, k, v)], dout)
    base_out, base_grads = _forward_and_grads(naive, (q, k, v), dout)
    bounds = term_bounds(q, k, v, dout, seq_lens, padding_side, causal, scale, keep, dropout_p)
    assert_flash_rule("out", out, layout(truth_out), layout(base_out), q.dtype, 2, floor_scale * out_floor_scale,
                      bounds["out"])  # fmt: skip
    for name, g, tg, bg in zip(("dq", "dk", "dv"), grads, truth_grads, base_grads):
        assert_flash_rule(name, g, layout(tg), layout(bg), q.dtype, 3, floor_scale, bounds[name])

    truth_lse = naive_lse(q, k, seq_lens, padding_side, causal, scale)  # [B, H, L]
    # A float32 dot product of length D is off by at most D * eps * sum_d |q_d k_d| (any
    # summation order); with huge logits that exceeds the fixed floor, so add it per row.
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    score_bound = scale * (q.detach().abs().double() @ k.detach().abs().double().transpose(-1, -2)).amax(-1)
    lse_atol = 1e-4 + head_dim * torch.finfo(lse_dtype).eps * score_bound  # [B, H, L]
    if varlen:
        truth_lse, lse_atol = (pack(t[..., None], seq_lens, padding_side)[..., 0].T for t in (truth_lse, lse_atol))
    assert lse["ours"].dtype == lse_dtype
    ours_lse = lse["ours"].double()
    assert torch.equal(ours_lse == -math.inf, truth_lse == -math.inf), (
        "LSE must be -inf exactly at rows that see no key"
    )
    seen = truth_lse > -math.inf
    lse_error = (ours_lse - truth_lse)[seen].abs()
    allowed = (lse_atol + 1e-5 * truth_lse.abs())[seen]
    assert (lse_error <= allowed).all(), f"LSE off by {(lse_error - allowed).max().item():.3g} beyond the bound"
    if not varlen:
        real = padded_token_mask(seq_lens, length, padding_side)[:, None, :, None]
        assert (out.masked_select(~real) == 0).all(), "padding rows must be zero"
        for g in grads:
            assert (g.masked_select(~real) == 0).all(), "padding rows must get zero gradients"
