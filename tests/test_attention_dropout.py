"""Attention dropout: the mask's statistics, reproducibility, and agreement across backends.

With non-causal attention and v = identity (L == D), out[b, h, i] is row i of the dropped
probability matrix, so the mask a kernel used can be read off its output.
"""

import pytest
import torch

from backends_under_test import ALL, KERNELS
from seqrec_kernels import fused_attention

BACKENDS = ALL
B, H, L = 2, 3, 64


def dropped_probabilities(backend, dropout_p, seed, q=None):
    torch.manual_seed(seed)
    q = torch.randn(B, H, L, L) * 0.1 if q is None else q
    v = torch.eye(L).expand(B, H, L, L)
    return fused_attention(q, q, v, causal=False, dropout_p=dropout_p, backend=backend), q


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.8])
def test_keep_rate_and_scaling(backend, dropout_p, fresh_seed):
    dropped, q = dropped_probabilities(backend, dropout_p, fresh_seed)
    probs = fused_attention(q, q, torch.eye(L).expand(B, H, L, L), causal=False, backend="reference")
    kept = dropped != 0
    n = kept.numel()
    keep_rate = kept.double().mean().item()
    sigma = ((1 - dropout_p) * dropout_p / n) ** 0.5
    assert abs(keep_rate - (1 - dropout_p)) < 5 * sigma, f"keep rate {keep_rate:.4f} for p={dropout_p}"
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - dropout_p))
    # Independent across heads, batch rows and neighbouring keys, not a repeated pattern.
    assert (kept[:, 0] != kept[:, 1]).any() and (kept[0] != kept[1]).any()
    neighbours_agree = (kept[..., 1:] == kept[..., :-1]).double().mean().item()
    expected_agree = dropout_p**2 + (1 - dropout_p) ** 2
    assert abs(neighbours_agree - expected_agree) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_and_new_seed_new_mask(backend):
    first, _ = dropped_probabilities(backend, 0.5, seed=7)
    again, _ = dropped_probabilities(backend, 0.5, seed=7)
    other, _ = dropped_probabilities(backend, 0.5, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first != 0, other != 0)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_uses_the_reference_mask_bit_for_bit(backend, fresh_seed):
    reference, _ = dropped_probabilities("reference", 0.3, fresh_seed)
    kernel, _ = dropped_probabilities(backend, 0.3, fresh_seed)
    assert torch.equal(reference != 0, kernel != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dropout_is_exact_and_takes_no_rng(backend):
    q, k, v = (torch.randn(2, 2, 20, 16) for _ in range(3))
    state = torch.get_rng_state()
    out = fused_attention(q, k, v, dropout_p=0.0, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, fused_attention(q, k, v, backend=backend))
