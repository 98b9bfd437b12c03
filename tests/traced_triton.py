"""What torch.compile sees of the Triton ops: the kernels in the graphs it traces.

Each public op that runs Triton kernels is compiled (fullgraph) with a backend that records
AOTAutograd's forward and backward graphs and runs them as they are; `kernels_in(graph)`
names the Triton kernels the graph launches (torch's triton_kernel_wrapper HOPs) and any
seqrec op it calls whole (an opaque call: what the Triton ops must no longer be). The
compiled outputs and gradients are compared with the float64 reference.

On a GPU the functions run the real kernels on CUDA tensors (tests/test_triton_op.py's gpu
tests). On a CPU, run as a script in a process without TRITON_INTERPRET, they run under
`interpret_compiled_kernels()`: the kernels are JITFunctions that Triton compiles for sm_90
(torch's kernel wrapper analyses their TTIR), while every launch runs Triton's interpreter on
the CPU tensors. The script prints one JSON object: case -> {forward, backward, error}.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch


def interpret_compiled_kernels() -> None:
    """Kernels compiled for sm_90 without a GPU, launched in Triton's interpreter on CPU
    tensors. Must run before seqrec_kernels is imported, without TRITON_INTERPRET."""
    os.environ.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang
    from triton.runtime.jit import JITFunction

    from benchmarks.host import stub_triton_launches

    reason = stub_triton_launches()  # an sm_90 target for the compiler; Triton accepted on CPU tensors
    if reason is not None:
        raise SystemExit(reason)
    interpreted: dict[int, InterpretedFunction] = {}

    def twin(kernel):
        if id(kernel) not in interpreted:
            interpreted[id(kernel)] = InterpretedFunction(kernel.fn)
        return interpreted[id(kernel)]

    compiled_call = JITFunction.__call__

    def interpreted_call(helper, *args, **kwargs):
        # As InterpretedFunction.__call__, but the interpreter's patches of triton.language come
        # off again: a helper of Triton's own (tl.cdiv) patches modules its kernel did not, and
        # left on they would break the next kernel that torch compiles to TTIR.
        scope = _patch_lang(helper.fn)
        try:
            return twin(helper).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    def interpreted_run(self, *args, grid, warmup, **kwargs):
        # Inside the kernel its @triton.jit helpers run interpreted too; outside, they compile.
        JITFunction.__call__ = interpreted_call
        try:
            return twin(self).run(*args, grid=grid, warmup=warmup, **kwargs)
        finally:
            JITFunction.__call__ = compiled_call

    JITFunction.run = interpreted_run


def kernels_in(graph: torch.fx.GraphModule) -> list[str]:
    """The Triton kernels `graph` launches (their function names) and the seqrec ops it calls
    whole ("seqrec::<op>"), in graph order."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    found = []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            while hasattr(kernel, "fn") and not hasattr(kernel, "arg_names"):  # an autotuner around it
                kernel = kernel.fn
            found.append(kernel.fn.__name__)
        elif str(getattr(node.target, "namespace", "")) == "seqrec":
            found.append(f"seqrec::{node.target._opname}")
    return found


class GraphRecorder:
    """A torch.compile backend that keeps AOTAutograd's forward and backward graphs and runs them."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd

        self.forward: list[torch.fx.GraphModule] = []
        self.backward: list[torch.fx.GraphModule] = []
        self.backend = aot_autograd(fw_compiler=self._keep(self.forward), bw_compiler=self._keep(self.backward))

    @staticmethod
    def _keep(graphs):
        from functorch.compile import make_boxed_func

        def compiler(graph, example_inputs):
            graphs.append(graph)
            return make_boxed_func(graph)

        return compiler


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def cases(device, num_items: int = 11) -> dict:
    """name -> (function(*inputs, backend) -> a tensor or tuple, inputs); float inputs get gradients
    where the op is differentiable. Attention at L=70, D=20 also pads its operands (_pad_rows);
    the losses and retrieval score num_items (at least 11) items."""
    import seqrec_kernels as sk

    def ints(*values):
        return torch.tensor(values, device=device)

    qkv = [torch.randn(2, 1, 70, 20, device=device) for _ in "qkv"]
    packed = [torch.randn(9, 2, 16, device=device) for _ in "qkv"]
    hidden, weight = torch.randn(6, 16, device=device), torch.randn(num_items, 16, device=device)
    return {
        "fused_attention": (
            lambda q, k, v, b: sk.fused_attention(q, k, v, seq_lens=ints(70, 33), backend=b),
            qkv,
        ),
        "fused_attention_varlen": (
            lambda q, k, v, b: sk.fused_attention_varlen(q, k, v, ints(0, 4, 9).int(), 5, backend=b),
            packed,
        ),
        "sampled_softmax_loss": (
            lambda h, w, b: sk.sampled_softmax_loss(h, w, ints(1, 2, 3, 0, 5, 6), ints(4, 7, 9), backend=b),
            [hidden, weight],
        ),
        "full_softmax_loss": (
            lambda h, w, b: sk.full_softmax_loss(h, w, ints(1, 2, 3, 0, 5, 10), backend=b),
            [hidden, weight],
        ),
        "topk_items": (lambda h, w, b: sk.topk_items(h, w, 3, backend=b)[1], [hidden, weight]),
        "target_ranks": (lambda h, w, b: sk.target_ranks(h, w, ints(1, 2, 3, 4, 5, 6), backend=b), [hidden, weight]),
    }


# Tuning candidates whose kernels differ from the defaults' (float32 atomics, a merge kernel),
# forced over a case: name -> (case, tuned kernel, configuration over its default, items).
FORCED_CASES = {
    "fused_attention, one-pass backward": (
        "fused_attention", "attention_bwd", dict(BLOCK_M=16, BLOCK_N=16, ATOMIC_DQ=True, MASK_EDGES_ONLY=True), 11,
    ),
    "full_softmax_loss, catalog split": (  # 40 items: three item tiles of 16, two splits
        "full_softmax_loss", "full_softmax_fwd", dict(BLOCK_N=16, ITEM_SPLITS=2), 40,
    ),
    "full_softmax_loss, fused backward": ("full_softmax_loss", "full_softmax_bwd", dict(FUSED=True), 11),
}  # fmt: skip


def run_forced_case(name: str, device) -> dict:
    """run_case of FORCED_CASES[name], compiled and run with its configuration forced."""
    from seqrec_kernels import tuning

    case, kernel, config, num_items = FORCED_CASES[name]
    torch._dynamo.reset()  # compiled afresh under the forced configuration
    with tuning.forcing(kernel, config):
        return run_case(*cases(device, num_items)[case])


def run_case(function, inputs) -> dict:
    """The case compiled on `triton` with a GraphRecorder, forward (and backward where its inputs
    take gradients): the kernels in each graph, and the largest error against the float64
    reference (outputs and gradients)."""
    recorder = GraphRecorder()
    compiled = torch.compile(lambda *args: function(*args, "triton"), backend=recorder.backend, fullgraph=True)
    ours, truth = _leaves(*inputs), _leaves(*(t.double() for t in inputs))
    results = [compiled(*ours), function(*truth, "reference")]
    error = 0.0
    if results[0].is_floating_point():
        grad = torch.randn_like(results[1])
        for result in results:
            result.backward(grad.to(result.dtype))
        pairs = [(results[0], results[1])] + [(a.grad, b.grad) for a, b in zip(ours, truth)]
        error = max(float((a.detach().double() - b.detach()).abs().max()) for a, b in pairs)
    elif not torch.equal(results[0], results[1]):
        error = float("inf")
    return {
        "forward": [name for graph in recorder.forward for name in kernels_in(graph)],
        "backward": [name for graph in recorder.backward for name in kernels_in(graph)],
        "error": error,
    }


def run_with_new_batch_sizes(device) -> dict:
    """fused_attention compiled once and called at batch sizes 2 and 3: the second call
    recompiles with a symbolic batch size (torch.compile's automatic dynamic shapes)."""
    import seqrec_kernels as sk

    recorder = GraphRecorder()
    compiled = torch.compile(
        lambda q, k, v, lens: sk.fused_attention(q, k, v, seq_lens=lens, backend="triton"),
        backend=recorder.backend,
        fullgraph=True,
    )
    error = 0.0
    for batch in (2, 3):
        q, k, v = (torch.randn(batch, 2, 40, 24, device=device, requires_grad=True) for _ in "qkv")
        seq_lens = torch.randint(0, 41, (batch,), device=device)
        out = compiled(q, k, v, seq_lens)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        truth = [t.detach().double().requires_grad_() for t in (q, k, v)]
        expected = sk.fused_attention(*truth, seq_lens=seq_lens, backend="reference")
        expected_grads = torch.autograd.grad(expected, truth, torch.ones_like(expected))
        pairs = [(out, expected), *zip(grads, expected_grads)]
        error = max(error, *(float((a.detach().double() - b.detach()).abs().max()) for a, b in pairs))
    return {
        "forward": [kernels_in(graph) for graph in recorder.forward],
        "backward": [kernels_in(graph) for graph in recorder.backward],
        "error": error,
    }


def opcheck_triton_ops(device) -> dict:
    """torch.library.opcheck of each Triton forward op (its schema, fake impl, autograd
    registration and AOTAutograd with dynamic shapes, where it decomposes): op -> failures."""
    ints = functools.partial(torch.tensor, device=device, dtype=torch.int32)
    q, k, v = (torch.randn(2, 1, 70, 20, device=device, requires_grad=True) for _ in "qkv")
    hidden = torch.randn(6, 16, device=device, requires_grad=True)
    weight = torch.randn(11, 16, device=device, requires_grad=True)
    targets, excluded = ints([1, 2, 3, 0, 5, 10]).long(), ints([0])
    exclude = ints([[1, 0], [0, 0], [4, 4], [0, 0], [9, 2], [0, 0]]).long()
    samples = {
        "attention_fwd_triton": (q, k, v, ints([0, 0]), ints([70, 33]), 70, True, 0.2, 0.0, None),
        "sampled_softmax_fwd_triton": (hidden, weight, targets, targets[:3].flip(0)[None], None, None, 6, True, 1.0, 0),
        "full_softmax_fwd_triton": (hidden, weight, targets, excluded, 1.0, 0),
        "topk_items_triton": (hidden.detach(), weight.detach(), exclude, excluded, 3),
        "target_ranks_triton": (hidden.detach(), weight.detach(), targets, exclude, excluded),
    }
    results = {}
    for name, args in samples.items():
        report = torch.library.opcheck(getattr(torch.ops.seqrec, name).default, args)
        results[name] = sorted(test for test, outcome in report.items() if outcome != "SUCCESS")
    return results


if __name__ == "__main__":
    interpret_compiled_kernels()
    torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    cpu = torch.device("cpu")
    report = {name: run_case(function, inputs) for name, (function, inputs) in cases(cpu).items()}
    report.update({name: run_forced_case(name, cpu) for name in FORCED_CASES})
    report["new batch sizes"] = run_with_new_batch_sizes(cpu)
    report["opcheck"] = opcheck_triton_ops(cpu)
    print(json.dumps(report))
