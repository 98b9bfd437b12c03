"""torch.compile sees the Triton kernels, not an opaque op (issue 24, item 4).

The Triton ops decompose under AOTAutograd into their launchers, whose launches are recorded
through torch.library.wrap_triton (ops/_library.py, _decompose_when_traced): the forward and
backward graphs of a compiled call hold the Triton kernels (triton_kernel_wrapper_functional)
and no seqrec op. tests/traced_triton.py compiles every public op that runs Triton kernels
with a backend that records those graphs.

On this CPU the kernels run in Triton's interpreter, which cannot run on the fake tensors of
a trace: in this process (TRITON_INTERPRET=1) the ops stay opaque, and the check runs in a
process without it, where Triton compiles the kernels for sm_90 (what torch's kernel wrapper
analyses) and every launch runs in the interpreter. What needs a GPU (Inductor's own launch of
the kernels, cudagraph trees) runs in the `gpu` tests below.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from traced_triton import GraphRecorder, cases, kernels_in, opcheck_triton_ops, run_case, run_with_new_batch_sizes

import seqrec_kernels as sk
from seqrec_kernels.backends import TRITON_INTERPRETED_AT_IMPORT

ROOT = Path(__file__).resolve().parent.parent

# Each case's kernels that its compiled forward and backward graphs must launch.
EXPECTED = {
    "fused_attention": ({"_attention_fwd_kernel"}, {"_attention_bwd_delta_kernel"}),
    "fused_attention_varlen": ({"_attention_fwd_kernel"}, {"_attention_bwd_delta_kernel"}),
    "sampled_softmax_loss": ({"_sampled_fwd_kernel"}, {"_sampled_bwd_kernel"}),
    "full_softmax_loss": ({"_full_fwd_kernel"}, {"_full_bwd_hidden_kernel", "_full_bwd_weight_kernel"}),
    "topk_items": ({"_topk_kernel"}, set()),
    "target_ranks": ({"_ranks_kernel"}, set()),
}
# The forced tuning candidates' kernels (tests/traced_triton.py FORCED_CASES): forward, backward.
EXPECTED_FORCED = {
    "fused_attention, one-pass backward": ({"_attention_fwd_kernel"}, {"_attention_bwd_fused_kernel"}),
    "full_softmax_loss, catalog split": ({"_full_fwd_kernel", "_merge_splits_kernel"}, {"_full_bwd_weight_kernel"}),
    "full_softmax_loss, fused backward": ({"_full_fwd_kernel"}, {"_full_bwd_weight_kernel"}),
}
TOLERANCE = 1e-4  # float32 against the float64 reference, at these sizes


def check_case(name: str, result: dict) -> None:
    forward, backward = {**EXPECTED, **EXPECTED_FORCED}[name]
    for phase, expected in (("forward", forward), ("backward", backward)):
        found = result[phase]
        assert expected <= set(found), f"{name} {phase}: {found}"
        assert not [n for n in found if n.startswith("seqrec::")], f"{name} {phase} calls an op whole: {found}"
    assert result["error"] < TOLERANCE, name


@pytest.fixture(scope="module")
def traced_on_cpu():
    """tests/traced_triton.py's report, from a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    seed = str(torch.randint(2**31, ()).item())
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "traced_triton.py"), seed],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_compiled_graphs_launch_the_triton_kernels(traced_on_cpu, name):
    check_case(name, traced_on_cpu[name])


@pytest.mark.parametrize("name", sorted(EXPECTED_FORCED))
def test_compiled_graphs_launch_forced_candidates(traced_on_cpu, name):
    """Candidates with atomics or extra kernels decompose too: the kernel wrapper's analysis of
    what they mutate keeps the atomics' buffers (the float32 dq, d hidden) in the graph."""
    check_case(name, traced_on_cpu[name])
    if "fused backward" in name:
        assert "_full_bwd_hidden_kernel" not in traced_on_cpu[name]["backward"]


def test_a_recompile_for_new_batch_sizes_launches_them_too(traced_on_cpu):
    result = traced_on_cpu["new batch sizes"]
    assert len(result["forward"]) == len(result["backward"]) == 2  # the second call recompiled
    for forward, backward in zip(result["forward"], result["backward"]):
        assert "_attention_fwd_kernel" in forward and "_attention_bwd_dq_kernel" in backward
        assert not [n for n in forward + backward if n.startswith("seqrec::")]
    assert result["error"] < TOLERANCE


def test_opcheck_passes_where_the_ops_decompose(traced_on_cpu):
    assert traced_on_cpu["opcheck"] == {name: [] for name in traced_on_cpu["opcheck"]}


@pytest.mark.skipif(not TRITON_INTERPRETED_AT_IMPORT, reason="the interpreter's fallback")
def test_interpreted_kernels_leave_the_op_opaque():
    """Under the interpreter the op stays one call in the graph (its kernels cannot run on the
    fake tensors of a trace), and compiles and computes as before."""
    function, inputs = cases(torch.device("cpu"))["fused_attention_varlen"]
    recorder = GraphRecorder()
    compiled = torch.compile(lambda *args: function(*args, "triton"), backend=recorder.backend, fullgraph=True)
    out = compiled(*inputs)
    assert kernels_in(recorder.forward[0]) == ["seqrec::attention_fwd_triton"]
    torch.testing.assert_close(out, function(*inputs, "reference"), atol=TOLERANCE, rtol=TOLERANCE)


# ----------------------------------------------------------------------------- GPU (next lease)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gpu_compiled_graphs_launch_the_triton_kernels(name):
    torch._dynamo.reset()
    check_case(name, run_case(*cases(torch.device("cuda"))[name]))


@pytest.mark.gpu
def test_gpu_recompile_and_opcheck_with_the_kernels_in_the_graph():
    torch._dynamo.reset()
    result = run_with_new_batch_sizes(torch.device("cuda"))
    assert len(result["forward"]) == 2 and result["error"] < TOLERANCE
    assert all("_attention_fwd_kernel" in graph for graph in result["forward"])
    assert opcheck_triton_ops(torch.device("cuda")) == {name: [] for name in EXPECTED_OPS}


EXPECTED_OPS = ["attention_fwd_triton", "sampled_softmax_fwd_triton", "full_softmax_fwd_triton",
                "topk_items_triton", "target_ranks_triton"]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_inductor_launches_them_and_cudagraphs_capture_them(mode):
    """Inductor compiles the graph with the Triton kernels in it (its own launches); with
    reduce-overhead, cudagraph trees capture the step and replay it on new values."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(4, 2, 50, 50, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    hidden = torch.randn(200, 50, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1000, 50, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(q, k, v, seq_lens, hidden, weight, targets, backend):
        out = sk.fused_attention(q, k, v, seq_lens=seq_lens, backend=backend)
        loss = sk.full_softmax_loss(hidden, weight, targets, backend=backend)
        return out.float().square().mean() + loss

    compiled = torch.compile(step, mode=mode, fullgraph=True)
    leaves = (q, k, v, hidden, weight)
    for _ in range(3):  # the later calls replay (reduce-overhead) on new values
        for t in leaves:
            t.data.normal_()
            t.grad = None
        seq_lens, targets = torch.randint(0, 51, (4,), device="cuda"), torch.randint(1, 1000, (200,), device="cuda")
        ours = compiled(q, k, v, seq_lens, hidden, weight, targets, "triton")
        grads = torch.autograd.grad(ours, leaves)
        expected = step(q, k, v, seq_lens, hidden, weight, targets, "triton")  # eager: the same kernels
        expected_grads = torch.autograd.grad(expected, leaves)
        torch.testing.assert_close(ours, expected, atol=2e-2, rtol=2e-2)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
