"""Host cost per op call: every public op x backend beside torch's counterpart, device work stubbed.

At recommender shapes a GPU kernel runs for microseconds; what the step waits for is the host
(Python, dispatch, autograd, launches, syncs). This benchmark measures that host time per call,
forward and forward+backward, on tensors so small that the device work is negligible:

- `reference`, `cpp` (the extension's glue, the same as `cuda`'s, over C++ loops that do next
  to nothing at these sizes) and torch's counterpart run as they are;
- `triton` runs its real launchers, Triton's binder and cache lookup included, with the launch
  itself stubbed out (on a CPU: kernels compiled once for sm_90 by Triton's compiler, no GPU
  needed, and a launcher that returns at once). Without a GPU, TRITON_INTERPRET must be unset
  (the interpreter is not what a GPU runs); this module unsets it before importing
  seqrec_kernels.
- on a GPU (--device cuda) every provider runs for real and `cuda` joins; the time is the
  wall-clock per call with one sync per batch of calls, i.e. host time while the GPU keeps up.

torch's counterparts: SDPA (is_causal) for attention, `cross_entropy` on a materialized logits
leaf for the losses, `topk` / a comparison count on a score matrix for retrieval.

    python -m benchmarks host [--quick] [--csv PATH] [--providers ...] [--shapes ...]
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable

if "seqrec_kernels" not in sys.modules:  # the launch stub needs compiled (not interpreted) kernels
    os.environ.pop("TRITON_INTERPRET", None)

import torch
import torch.nn.functional as F

from benchmarks import common

PROVIDERS = ["reference", "triton", "cuda", "cpp", "torch"]
TORCH_COUNTERPART = {"attention": "sdpa", "attention varlen": "sdpa", "sampled softmax": "cross_entropy",
                     "full softmax": "cross_entropy", "topk_items": "topk", "target_ranks": "topk"}  # fmt: skip
COLUMNS = ["variant", "mode", "provider", "status", "ms", "speedup_vs_best_torch", "best_torch", "goal", "goal_met"]
# The goals: ours / torch's host time at most this (attention: forward and forward+backward).
GOALS = {("attention", "forward"): 2.0, ("attention", "forward+backward"): 1.5,
         ("attention varlen", "forward"): 2.0, ("attention varlen", "forward+backward"): 1.5,
         ("sampled softmax", "forward+backward"): 1.5, ("full softmax", "forward+backward"): 1.5}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at tiny sizes: the kernel work is negligible, the host work is all there is."""

    op: str
    shape: str
    differentiable: bool = True


CASES = [
    Case("attention", "B=1 H=1 L=2 D=8"),
    Case("attention varlen", "T=2 H=1 D=8"),
    Case("sampled softmax", "T=2 D=8 N=4 K=2"),
    Case("full softmax", "T=2 D=8 N=4"),
    Case("topk_items", "B=1 D=8 N=4 k=2", differentiable=False),
    Case("target_ranks", "B=1 D=8 N=4", differentiable=False),
]


# ----------------------------------------------------------------------------- the Triton stub


def stub_triton_launches() -> str | None:
    """Makes Triton compile kernels for sm_90 and launch them as a no-op, on a machine without a
    GPU; None when done, else why Triton cannot be measured here. Everything up to the launch
    (our launcher, Triton's binder, its cache key and lookup, the launcher's argument packing
    up to the driver call) runs for real."""
    from seqrec_kernels import backends

    if backends.TRITON_INTERPRETED_AT_IMPORT:
        return "skipped: seqrec_kernels was imported with TRITON_INTERPRET set (the interpreter is no launch)"
    if not backends.TRITON_INSTALLED:
        return "skipped: triton is not installed"
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    class NoGpuDriver:  # what the launchers ask the driver, answered for an sm_90 GPU
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    def no_launch(*args):
        return None

    def stub_handles(kernel):  # instead of loading the cubin on a GPU
        kernel.module, kernel.function, kernel._run = "stub", 0, no_launch

    driver.set_active(NoGpuDriver())
    CompiledKernel._init_handles = stub_handles
    # Triton is offered on CPU tensors only under the interpreter: here its launchers run on them.
    unavailable = backends._unavailable_reason
    backends._unavailable_reason = lambda b, d: None if b is backends.Backend.TRITON else unavailable(b, d)
    return None


# ----------------------------------------------------------------------------- the calls


def make_call(case: Case, provider: str, backward: bool, device) -> Callable[[], object]:
    """A function that runs one call of `provider` on `case` (forward, or forward+backward)."""
    import seqrec_kernels as sk

    torch.manual_seed(0)
    grad = dict(requires_grad=case.differentiable, device=device)
    if case.op in ("attention", "attention varlen"):
        if case.op == "attention":
            q, k, v = (torch.randn(1, 1, 2, 8, **grad) for _ in "qkv")
            seq_lens = torch.tensor([2], device=device)
            ours = lambda b: sk.fused_attention(q, k, v, seq_lens=seq_lens, backend=b)  # noqa: E731
        else:
            q, k, v = (torch.randn(2, 1, 8, **grad) for _ in "qkv")
            cu_seqlens = torch.tensor([0, 2], dtype=torch.int32, device=device)
            ours = lambda b: sk.fused_attention_varlen(q, k, v, cu_seqlens, 2, backend=b)  # noqa: E731
        sdpa_q, sdpa_k, sdpa_v = (torch.randn(1, 1, 2, 8, **grad) for _ in "qkv")
        counterpart = lambda: F.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v, is_causal=True)  # noqa: E731
        dout = torch.randn(1, 1, 2, 8, device=device)
        finish = lambda out: out.backward(dout.view(out.shape))  # noqa: E731
    elif case.op in ("sampled softmax", "full softmax"):
        hidden, weight = torch.randn(2, 8, **grad), torch.randn(4, 8, **grad)
        targets = torch.tensor([1, 3], device=device)
        if case.op == "sampled softmax":
            neg_ids = torch.tensor([2, 3], device=device)
            ours = lambda b: sk.sampled_softmax_loss(hidden, weight, targets, neg_ids, backend=b)  # noqa: E731
            logits = torch.randn(2, 3, **grad)  # [T, 1 + K]: the positive's and the negatives' logits
            labels = torch.zeros(2, dtype=torch.long, device=device)
        else:
            ours = lambda b: sk.full_softmax_loss(hidden, weight, targets, backend=b)  # noqa: E731
            logits, labels = torch.randn(2, 4, **grad), targets
        counterpart = lambda: F.cross_entropy(logits, labels)  # noqa: E731
        finish = lambda loss: loss.backward()  # noqa: E731
    else:
        hidden, weight = torch.randn(1, 8, device=device), torch.randn(4, 8, device=device)
        scores, targets = torch.randn(1, 4, device=device), torch.tensor([3], device=device)
        if case.op == "topk_items":
            ours = lambda b: sk.topk_items(hidden, weight, 2, backend=b)  # noqa: E731
            counterpart = lambda: scores.topk(2, dim=1)  # noqa: E731
        else:
            ours = lambda b: sk.target_ranks(hidden, weight, targets, backend=b)  # noqa: E731
            counterpart = lambda: (scores > scores.gather(1, targets[:, None])).sum(1)  # noqa: E731
        finish = None
    forward = counterpart if provider == "torch" else (lambda: ours(provider))
    if not backward:
        return forward
    return lambda: finish(forward())


def host_ms(call: Callable[[], object], device, quick: bool) -> float:
    """Median over batches of the mean wall-clock time per call (ms), one sync per batch."""
    for _ in range(20):  # warm-up: first-call compiles and caches
        call()
    common.synchronize(device)
    per_batch, batches = (50, 10) if quick else (200, 25)
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(per_batch):
            call()
        common.synchronize(device)
        times.append((time.perf_counter() - started) * 1e3 / per_batch)
    return statistics.median(times)


def measure(case: Case, provider: str, backward: bool, device, quick: bool, unavailable: str | None):
    if unavailable:
        return common.Measurement(unavailable)
    if provider in ("cuda", "cpp") and not case.differentiable:
        return common.Measurement("unsupported: the C++/CUDA extension has no retrieval ops")
    try:
        return common.Measurement("unchecked", host_ms(make_call(case, provider, backward, device), device, quick))
    except Exception as error:  # noqa: BLE001 - a failing provider is a result to report
        return common.Measurement(f"error: {type(error).__name__}: {str(error).splitlines()[0]}"[:240])


def goal(case: Case, mode: str):
    """The comparison function common.compare calls: (goal text, met) for our timed rows."""
    ratio = GOALS.get((case.op, mode))
    counterpart = TORCH_COUNTERPART[case.op]

    def judge(row: common.Row, by_provider: dict[str, common.Row]):
        torch_row = by_provider.get("torch")
        if ratio is None or row.ms is None or torch_row is None or torch_row.ms is None:
            return None
        return f"host time <= {ratio}x {counterpart}'s", row.ms <= ratio * torch_row.ms

    return judge


def unavailable_reasons(names, device, triton_stub: str | None) -> dict[str, str | None]:
    from seqrec_kernels import available

    usable = {b.value for b in available(device)}
    reasons = {}
    for name in names:
        if name == "triton" and device.type == "cpu":
            reasons[name] = triton_stub
        elif name in common.OURS and name not in usable:
            reasons[name] = f"skipped: the backend is not available on {device.type}"
        else:
            reasons[name] = None
    return reasons


def main(argv=None) -> list[common.Row]:
    args = common.parser("host", __doc__, ", ".join(c.op for c in CASES), PROVIDERS).parse_args(argv)
    device = common.setup(args)
    names = common.selected(args.providers, PROVIDERS, "--providers")
    cases = [c for c in CASES if c.op in common.selected(args.shapes, [c.op for c in CASES], "--shapes", True)]
    triton_stub = stub_triton_launches() if device.type == "cpu" and "triton" in names else None
    reasons = unavailable_reasons(names, device, triton_stub)
    torch.set_num_threads(1)  # host work: one thread, no intra-op pool wake-ups in the timings
    env = common.environment(device)
    print(f"host on {env.describe()}")
    rows = []
    for case in cases:
        for mode in ("forward", "forward+backward") if case.differentiable else ("forward",):
            config = []
            for name in names:
                result = measure(case, name, mode != "forward", device, args.quick, reasons[name])
                label = TORCH_COUNTERPART[case.op] if name == "torch" else name
                config.append(common.new_row(
                    env, args.quick, result, benchmark="host", shape=case.shape, variant=case.op,
                    dtype="float32", mode=mode, provider=name if name != "torch" else "torch", best_torch=label,
                ))  # fmt: skip
            common.compare(config, env, goal(case, mode))
            for row in config:  # the ratio to torch's counterpart, not to the reference
                torch_row = next((r for r in config if r.provider == "torch"), None)
                row.speedup_vs_best_torch = common.speedup(row, torch_row)
                row.best_torch = TORCH_COUNTERPART[case.op]
            common.print_config(f"{case.op} {case.shape}, {mode}", config)
            rows += config
    note = (
        "Host time per call (ms, median over batches of calls) on tiny float32 tensors, device work stubbed "
        "(CPU: Triton kernels compiled for sm_90, launched as a no-op; reference and cpp run their trivial work). "
        "`torch`: torch's counterpart (best_torch names it) on tensors of the same sizes. x best torch: its time / "
        "ours (below 1: we are slower). forward: inputs that require grad (the autograd node is built)."
    )
    common.report("host", rows, env, args.csv, COLUMNS, note)
    return rows


if __name__ == "__main__":
    main()
