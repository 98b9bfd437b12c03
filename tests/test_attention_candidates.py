"""The attention tuning candidates (benchmarks/tune.py CANDIDATES) compute the op's function.
Triton's backward: the one-pass backward with dq summed by float32 atomics (ATOMIC_DQ, with and without
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
from seqrec_kernels.backends import EXTENSION_ERROR, triton_interpreter_enabled
from seqrec_kernels.triton import attention as triton_attention

interpreted = pytest.mark.skipif(not triton_interpreter_enabled(), reason="observes launches in Triton's interpreter")


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


@interpreted
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", ATOMIC_CONFIGS)
def test_one_pass_backward_matches_the_truth(launches, config, layout):
    _check(ATOMIC_CONFIGS[config], layout, 11, launches, "_attention_bwd_fused_kernel")
    assert "_attention_bwd_dq_kernel" not in launches and "_attention_bwd_dkdv_kernel" not in launches
    (fused,) = launches["_attention_bwd_fused_kernel"]
    assert fused["MASK_EDGES_ONLY"] is ATOMIC_CONFIGS[config].get("MASK_EDGES_ONLY", False)


@interpreted
@pytest.mark.parametrize("layout", ["left-causal", "packed-causal-dropout"])
def test_heavy_first_two_pass_backward_matches_the_truth(launches, layout):
    _check(dict(BLOCK_M=16, BLOCK_N=16, HEAVY_FIRST=True), layout, 12, launches, "_attention_bwd_dq_kernel")
    assert [launch["HEAVY_FIRST"] for launch in launches["_attention_bwd_dq_kernel"]] == [True]


@interpreted
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


@interpreted
def test_one_pass_and_edge_masking_agree_with_the_default_backward(launches):
    """Edge-only masking skips the mask only where it changes nothing: dk and dv (one writer
    per row, the same summation order) equal those of the masked one-pass backward, and dq
    (atomics) agrees to float32 rounding, over lengths that end on and off every tile edge."""
    q, k, v = (torch.randn(6, 1, 70, 16, generator=torch.Generator().manual_seed(14)) for _ in "qkv")
    seq_lens = torch.tensor([70, 64, 33, 32, 1, 0])
    dout = torch.randn(6, 1, 70, 16)

    def grads(config):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        with tuning.forcing("attention_bwd", config):  # the backward too runs inside
            out = sk.fused_attention(*inputs, seq_lens=seq_lens, backend="triton")
            return torch.autograd.grad(out, inputs, dout)

    blocks = dict(BLOCK_M=16, BLOCK_N=32, ATOMIC_DQ=True)
    (dq, dk, dv), (edges_dq, edges_dk, edges_dv) = grads(blocks), grads(dict(blocks, MASK_EDGES_ONLY=True))
    assert [launch["MASK_EDGES_ONLY"] for launch in launches["_attention_bwd_fused_kernel"]] == [False, True]
    assert torch.equal(edges_dk, dk) and torch.equal(edges_dv, dv)
    torch.testing.assert_close(edges_dq, dq, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- GPU


def _bwd_candidates(option, head_dim):
    """The sweep's attention_bwd candidates with `option` meant for this head dim."""
    from benchmarks.tune import candidates_for

    return [c for c in candidates_for("attention_bwd", max(16, 1 << (head_dim - 1).bit_length())) if c.get(option)]


@pytest.mark.gpu
@pytest.mark.parametrize(("option", "head_dim"), [("ATOMIC_DQ", 50), ("ATOMIC_DQ", 128), ("HEAVY_FIRST", 64)])
def test_gpu_backward_candidates_match_the_truth(option, head_dim):
    """The sweep's own backward candidates, compiled for the GPU at hand, by the rule: several
    tiles per sequence, lengths off the tile edges, 0 and 1, left padding or packed in turn,
    causal and not."""
    configs = _bwd_candidates(option, head_dim)
    assert configs, f"no {option} candidate for D={head_dim}"
    seq_lens = torch.tensor([300, 129, 1, 0, 64], device="cuda")
    for number, config in enumerate(configs):
        varlen = number % 2 == 1  # left padding, packed, left padding, ...
        q, k, v = make_qkv(5, 2, 300, head_dim, torch.bfloat16, generator=torch.Generator().manual_seed(15))
        q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))
        for causal in (True, False):
            with tuning.forcing("attention_bwd", config):
                check_against_truth(q, k, v, seq_lens, "right" if varlen else "left", causal, "triton",
                                    dropout_p=0.1, varlen=varlen, tail=5 if varlen else 0)  # fmt: skip


def _cuda_switch():
    from seqrec_kernels.backends import extension_has_cuda_kernels

    if not extension_has_cuda_kernels():
        pytest.skip("seqrec_kernels._C has no CUDA kernels")
    return torch.ops.seqrec._set_attention_kv_stages


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [20, 50, 64, 128, 200])
def test_gpu_cuda_double_buffered_forward_is_the_default_bit_for_bit(dtype, head_dim):
    """The double-buffered forward (K/V stages 2) computes every tile as today's (the same
    products and softmax in the same order): the same bits of out and LSE, padded (left,
    right) and packed, causal or not, with dropout, lengths 0, 1, on and off the 64-row tiles."""
    switch = _cuda_switch()
    q, k, v = (torch.randn(6, 2, 200, head_dim, device="cuda", dtype=dtype) for _ in "qkv")
    seq_lens = torch.tensor([200, 64, 65, 1, 0, 137], device="cuda")
    cu_seqlens = torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32)
    packed = [t.transpose(1, 2).reshape(-1, 2, head_dim)[: int(seq_lens.sum())] for t in (q, k, v)]

    def run():
        results = []
        for causal in (True, False):
            for side in ("left", "right"):
                results += sk.fused_attention(q, k, v, seq_lens=seq_lens, padding_side=side, causal=causal,
                                              backend="cuda", return_lse=True)  # fmt: skip
            results += sk.fused_attention_varlen(*packed, cu_seqlens, 200, causal=causal, backend="cuda",
                                                 return_lse=True)  # fmt: skip
        torch.manual_seed(0)  # the same dropout seed in both runs
        results += sk.fused_attention(q, k, v, seq_lens=seq_lens, dropout_p=0.3, backend="cuda", return_lse=True)
        return results

    expected = run()
    previous = switch(2)
    try:
        assert previous == 1, "the switch starts at one stage (else this compares the candidate with itself)"
        assert switch(2) == 2, "the switch returns the previous value"
        double_buffered = run()
    finally:
        switch(previous)
    for ours, theirs in zip(double_buffered, expected):
        assert torch.equal(ours, theirs)


@pytest.mark.gpu
def test_gpu_cuda_kv_stages_switch_checks_its_value():
    switch = _cuda_switch()
    with pytest.raises(ValueError, match="stages must be 1 or 2"):
        switch(3)
    assert switch(1) == 1


@interpreted
@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))
def test_sweep_times_the_cuda_forward_switch_at_attention_classes(monkeypatch):
    """benchmarks/tune.py times cuda_attention_fwd at its attention classes by setting the
    extension's switch around each run, and restores it. On CPU, with a stand-in switch (the
    extension's item id checks): the `cuda` backend rejects CPU tensors, so both settings are
    logged as errors and nothing is written for it, while the Triton kernels are tuned."""
    from benchmarks import tune

    seen = []
    monkeypatch.setattr(tune, "CUDA_SWITCHES", {"cuda_attention_fwd": (dict(ON=True), "_set_item_id_checks")})
    monkeypatch.setattr(tune, "_has_cuda_switches", lambda device: True)
    candidates = dict(tune.DRY_RUN_CANDIDATES, attention_fwd=[], attention_bwd=[])  # the defaults only
    candidates["cuda_attention_fwd"] = [(dict(ON=False), 1024)]
    results = tune.tune_class(tune.DRY_RUN_CLASSES[0], torch.device("cpu"), candidates, seen.append)
    cuda_lines = [line for line in seen if "cuda_attention_fwd" in line]
    assert len(cuda_lines) == 3 and "{'ON': True}" in cuda_lines[0] and "{'ON': False}" in cuda_lines[1]
    assert set(results) == {"attention_fwd", "attention_bwd"}
    assert torch.ops.seqrec._set_item_id_checks(True) is True  # restored after each run
