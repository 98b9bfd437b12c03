"""The attention backward's tuning candidates (benchmarks/tune.py CANDIDATES) compute the op's
function: the one-pass backward with dq summed by float32 atomics (ATOMIC_DQ, with and without
MASK_EDGES_ONLY) and the two-pass backward with its dq blocks last to first (HEAVY_FIRST),
forced through `seqrec_kernels.tuning.forcing` and checked against the float64 truth by the
FlashAttention rule (attention_helpers.check_against_truth: out, LSE, dq, dk, dv, zeros at
padding rows and on a packed tail), in Triton's interpreter. Shapes: L not a multiple of the
blocks, head dims that are not powers of two, lengths 0, 1 and on a tile edge, blocks taller
than wide and the reverse, left and right padding, packed."""

import pytest
import torch

import seqrec_kernels as sk
from attention_helpers import check_against_truth, make_qkv
from seqrec_kernels import tuning
from seqrec_kernels.backends import triton_interpreter_enabled
from seqrec_kernels.triton import attention as triton_attention

pytestmark = pytest.mark.skipif(not triton_interpreter_enabled(), reason="observes launches in Triton's interpreter")


@pytest.fixture
def launches(monkeypatch):
    """{kernel name: [the launch's keyword arguments, ...]} of every Triton launch."""
    seen = {}
    kernel_class = type(triton_attention._attention_fwd_kernel)
    launch = kernel_class.run

    def recorded(kernel, *args, **kwargs):
        seen.setdefault(kernel.fn.__name__, []).append(kwargs)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recorded)
    return seen


ATOMIC_CONFIGS = {
    "16x32": dict(BLOCK_M=16, BLOCK_N=32, ATOMIC_DQ=True),
    "32x16-edges": dict(BLOCK_M=32, BLOCK_N=16, ATOMIC_DQ=True, MASK_EDGES_ONLY=True),
    "16x16-edges": dict(BLOCK_M=16, BLOCK_N=16, ATOMIC_DQ=True, MASK_EDGES_ONLY=True),
}
# (padding side or "packed", causal, dropout_p, head dim, dtype)
LAYOUTS = {
    "left-causal": ("left", True, 0.0, 20, torch.float32),
    "right-noncausal-dropout": ("right", False, 0.3, 50, torch.float32),
    "packed-causal-dropout": ("packed", True, 0.2, 20, torch.float32),
    "right-causal-bf16": ("right", True, 0.0, 24, torch.bfloat16),
}


def _check(config, layout, seed, launches, expected_kernel):
    side, causal, dropout_p, head_dim, dtype = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(5, 2, 37, head_dim, dtype, strided=side == "right", generator=generator)
    seq_lens = torch.tensor([37, 16, 1, 0, 29])  # 16: on a tile edge; 37, 29: mid-tile
    varlen = side == "packed"
    with tuning.forcing("attention_bwd", config):
        check_against_truth(q, k, v, seq_lens, "right" if varlen else side, causal, "triton", dropout_p=dropout_p,
                            varlen=varlen, tail=3 if varlen else 0)  # fmt: skip
    assert expected_kernel in launches, f"{expected_kernel} was not launched: {sorted(launches)}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", ATOMIC_CONFIGS)
def test_one_pass_backward_matches_the_truth(launches, config, layout):
    _check(ATOMIC_CONFIGS[config], layout, 11, launches, "_attention_bwd_fused_kernel")
    assert "_attention_bwd_dq_kernel" not in launches and "_attention_bwd_dkdv_kernel" not in launches
    (fused,) = launches["_attention_bwd_fused_kernel"]
    assert fused["MASK_EDGES_ONLY"] is ATOMIC_CONFIGS[config].get("MASK_EDGES_ONLY", False)


@pytest.mark.parametrize("layout", ["left-causal", "packed-causal-dropout"])
def test_heavy_first_two_pass_backward_matches_the_truth(launches, layout):
    _check(dict(BLOCK_M=16, BLOCK_N=16, HEAVY_FIRST=True), layout, 12, launches, "_attention_bwd_dq_kernel")
    assert [launch["HEAVY_FIRST"] for launch in launches["_attention_bwd_dq_kernel"]] == [True]


def test_deterministic_mode_keeps_the_two_pass_backward(launches):
    """dq by atomics is summed in no fixed order: under torch.use_deterministic_algorithms the
    launcher runs the deterministic two-pass backward even where a table picks ATOMIC_DQ."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _check(ATOMIC_CONFIGS["16x32"], "left-causal", 13, launches, "_attention_bwd_dq_kernel")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert "_attention_bwd_fused_kernel" not in launches


def test_one_pass_and_edge_masking_agree_with_the_default_backward(launches):
    """Edge-only masking skips the mask only where it changes nothing: dk and dv (one writer
    per row, the same summation order) equal those of the masked one-pass backward, and dq
    (atomics) agrees to float32 rounding, over lengths that end on and off every tile edge."""
    q, k, v = (torch.randn(6, 1, 70, 16, generator=torch.Generator().manual_seed(14)) for _ in "qkv")
    seq_lens = torch.tensor([70, 64, 33, 32, 1, 0])
    dout = torch.randn(6, 1, 70, 16)

    def grads(config):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        with tuning.forcing("attention_bwd", config):
            out = sk.fused_attention(*inputs, seq_lens=seq_lens, backend="triton")
        return torch.autograd.grad(out, inputs, dout)

    blocks = dict(BLOCK_M=16, BLOCK_N=32, ATOMIC_DQ=True)
    (dq, dk, dv), (edges_dq, edges_dk, edges_dv) = grads(blocks), grads(dict(blocks, MASK_EDGES_ONLY=True))
    assert torch.equal(edges_dk, dk) and torch.equal(edges_dv, dv)
    torch.testing.assert_close(edges_dq, dq, atol=1e-6, rtol=1e-5)
