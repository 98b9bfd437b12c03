"""The host path of every op (docs/host-path.md): the lean eager path computes what the custom
op computes; no host read of an index value on the path device tensors take, invalid values
there reported by seqrec_kernels.check(); compiled Triton kernels launched from a cache that
selects the kernel Triton selects; excluded ids built once; the host benchmark runs.

On a CPU the tests' tensors stand in for device tensors: `values_on_host` (the one place that
decides whether reading values is free) is patched to say no, so that the ops take the path
CUDA tensors take. Timings are the benchmark's business (python -m benchmarks host), not
these tests'."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from host_reads import HostReadCounter
from torch.utils._python_dispatch import _disable_current_modes

import seqrec_kernels as sk
from seqrec_kernels import _checks
from seqrec_kernels.ops import _library
from seqrec_kernels.triton import attention as triton_attention

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["reference", "triton", "cpp"]


@pytest.fixture
def device_path(monkeypatch):
    """Index values take the path of device tensors: deferred checks, never read on the host."""
    monkeypatch.setattr(_checks, "values_on_host", lambda values: False)
    _checks._device_errors.clear()
    yield
    _checks._device_errors.clear()


@pytest.fixture
def interpreter_reads_unseen(monkeypatch):
    """The interpreter's own copies of kernel arguments are no host reads of ours (a GPU
    launch reads nothing)."""
    kernel_class = type(triton_attention._attention_fwd_kernel)
    launch = kernel_class.run

    def without_modes(kernel, *args, **kwargs):
        with _disable_current_modes():
            return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", without_modes)


def _calls(backend, bad=None):
    """name -> fn() running one op forward (+ backward where it has one); `bad` names the
    argument given invalid index values (a device-side error for check())."""
    q, k, v = (torch.randn(3, 2, 9, 16, requires_grad=True) for _ in "qkv")
    seq_lens = torch.tensor([9, 4, 12 if bad == "seq_lens" else 0])
    packed = [torch.randn(20, 2, 16, requires_grad=True) for _ in "qkv"]
    cu_seqlens = torch.tensor([0, 9, 25 if bad == "cu_seqlens" else 16], dtype=torch.int32)
    hidden, weight = torch.randn(2, 7, 16, requires_grad=True), torch.randn(30, 16, requires_grad=True)
    targets = torch.randint(6, 30, (2, 7))
    targets[:, :2] = 0  # ignored rows
    if bad == "pos_ids":
        targets[1, 3] = 30
    neg_ids = torch.randint(1, 30, (2, 5))
    if bad == "neg_ids":
        neg_ids[0, 0] = -1
    full_targets = targets.clone()
    if bad == "targets":
        full_targets[0, 4] = 5  # an excluded item
    exclude = torch.randint(0, 30, (2, 4))
    if bad == "exclude":
        exclude[0, 1] = 31
    rank_targets = torch.randint(1, 30, (14,))
    if bad == "rank targets":
        rank_targets[3] = 35
    return {
        "fused_attention": lambda: sk.fused_attention(q, k, v, seq_lens=seq_lens, backend=backend).sum().backward(),
        "fused_attention_varlen": lambda: (
            sk.fused_attention_varlen(*packed, cu_seqlens, 9, backend=backend).sum().backward()
        ),
        "sampled_softmax_loss": lambda: sk.sampled_softmax_loss(
            hidden, weight, targets, neg_ids, backend=backend
        ).backward(),
        "full_softmax_loss": lambda: sk.full_softmax_loss(
            hidden, weight, full_targets, exclude_items=(0, 5), backend=backend
        ).backward(),
        "topk_items": lambda: sk.topk_items(hidden[0], weight, 3, exclude=exclude[:1].expand(7, 4), backend=backend),
        "target_ranks": lambda: sk.target_ranks(
            hidden.reshape(14, 16), weight, rank_targets, exclude=exclude.repeat(7, 1), backend=backend
        ),
    }


@pytest.mark.parametrize("eager", [True, False], ids=["eager path", "custom op"])
@pytest.mark.parametrize("op_name", sorted(_calls("triton")))
def test_no_host_reads_on_the_device_path(op_name, eager, device_path, interpreter_reads_unseen, monkeypatch):
    """Zero host reads (syncs on a GPU) on the Triton path, value checks on by default, on
    both entry points, each forced (the counter, a dispatch mode, would otherwise let the
    ops take their eager path)."""
    monkeypatch.setattr(_library, "_eager_possible", lambda first: eager)
    run = _calls("triton")[op_name]
    run()  # first calls compile nothing in the interpreter, but build the cached excluded ids
    with HostReadCounter() as counter:
        run()
    assert counter.reads == []


BAD = {
    "seq_lens": ("fused_attention", "seq_lens: expected values in [0, 9] (L), got values outside"),
    "cu_seqlens": ("fused_attention_varlen", "cu_seqlens: expected non-decreasing offsets from 0 to at most T=20"),
    "pos_ids": ("sampled_softmax_loss", "pos_ids: expected item ids in [0, 30) (N), got values outside"),
    "neg_ids": ("sampled_softmax_loss", "neg_ids: expected item ids in [0, 30) (N), got values outside"),
    "targets": ("full_softmax_loss", "targets: a non-ignored target is an excluded item ([0, 5])"),
    "exclude": ("topk_items", "exclude: expected item ids in [0, 30) (N), got values outside"),
    "rank targets": ("target_ranks", "targets: expected item ids in [0, 30) (N), got values outside"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_invalid_device_values_raise_at_check(bad, device_path):
    """The call returns (the kernels mask or clamp what is out of range); check() raises the
    argument's error once, then the flags are clear. value_checks(True) raises at the call."""
    op_name, message = BAD[bad]
    _calls("triton", bad)[op_name]()
    with pytest.raises(ValueError, match=r"^" + re.escape(message)):
        sk.check()
    sk.check()
    with sk.value_checks(True), pytest.raises(ValueError, match=re.escape(message.split(":")[0] + ":")):
        _calls("triton", bad)[op_name]()
    with sk.value_checks(False):
        _calls("triton", bad)[op_name]()
    sk.check()


def test_valid_device_values_raise_nothing(device_path):
    for run in _calls("triton").values():
        run()
    # seq_lens, cu_seqlens, pos_ids, neg_ids, targets (range; excluded), exclude: flagged on the device
    assert {name for name, _ in _checks._device_errors} == {"seq_lens", "cu_seqlens", "pos_ids", "neg_ids",
                                                            "targets", "exclude"}  # fmt: skip
    sk.check()


def _outputs_and_grads(run_op, inputs):
    for t in inputs:
        t.grad = None
    out = run_op()
    first = out[0] if isinstance(out, tuple) else out
    first.float().sum().backward()
    return [o.detach().clone() for o in (out if isinstance(out, tuple) else (out,))] + [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_name", ["fused_attention", "fused_attention_varlen", "sampled", "full"])
def test_eager_path_computes_what_the_custom_op_computes(op_name, backend, monkeypatch):
    """Bitwise the same outputs and gradients through either entry point; a plain call takes
    the eager path (its autograd node is the eager Function's)."""
    q, k, v = (torch.randn(2, 3, 11, 16, requires_grad=True) for _ in "qkv")
    hidden, weight = torch.randn(13, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets, neg_ids = torch.randint(0, 40, (13,)), torch.randint(1, 40, (13, 4))
    runs = {
        "fused_attention": (
            lambda: sk.fused_attention(q, k, v, seq_lens=torch.tensor([11, 6]), backend=backend, return_lse=True),
            (q, k, v),
        ),
        "fused_attention_varlen": (
            lambda: sk.fused_attention_varlen(
                q[0].transpose(0, 1),
                k[0].transpose(0, 1),
                v[0].transpose(0, 1),
                torch.tensor([0, 4, 10]),
                6,
                backend=backend,
                return_lse=True,
                causal=False,
            ),
            (q, k, v),
        ),  # fmt: skip
        "sampled": (
            lambda: sk.sampled_softmax_loss(hidden, weight, targets, neg_ids, backend=backend),
            (hidden, weight),
        ),
        "full": (
            lambda: sk.full_softmax_loss(hidden, weight, targets, backend=backend, return_lse=True, reduction="sum"),
            (hidden, weight),
        ),
    }
    run_op, inputs = runs[op_name]
    first = run_op()
    first = first[0] if isinstance(first, tuple) else first
    node = first.grad_fn
    while node is not None and "eager" not in type(node).__name__ and node.next_functions:
        node = node.next_functions[0][0]
    assert "_eagerBackward" in type(node).__name__
    eager = _outputs_and_grads(run_op, inputs)
    monkeypatch.setattr(_library, "_eager_possible", lambda first: False)
    custom_op = _outputs_and_grads(run_op, inputs)
    assert len(eager) == len(custom_op)
    for a, b in zip(eager, custom_op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_follows_autocast(backend, monkeypatch):
    """Under torch.autocast the eager path casts q, k, v as the custom op's autocast rule does."""
    q, k, v = (torch.randn(2, 1, 5, 16, requires_grad=True) for _ in "qkv")
    results = []
    for eager in (True, False):
        monkeypatch.setattr(_library, "_eager_possible", lambda first, eager=eager: eager)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sk.fused_attention(q, k, v, backend=backend)
        (grad_q,) = torch.autograd.grad(out.float().sum(), q)
        results.append((out, grad_q))
    assert results[0][0].dtype == torch.bfloat16 and results[0][1].dtype == torch.float32
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_excluded_ids_are_built_once():
    first = _library.excluded_items([5, 0, 5], 10, torch.device("cpu"))
    assert first[0] == (0, 5) and first[1].tolist() == [0, 5]
    assert _library.excluded_items((0, 5), 10, torch.device("cpu"))[1] is not first[1]  # another key
    assert _library.excluded_items([5, 0, 5], 10, torch.device("cpu"))[1] is first[1]
    with pytest.raises(ValueError, match=r"exclude_items: expected item ids in \[0, 10\) \(N\), got \[10\]"):
        _library.excluded_items([10], 10, torch.device("cpu"))


# A worker without the interpreter: Triton compiles for sm_90 and launches as a no-op (the host
# benchmark's stub); every launch_kernel call is compared with what Triton's generic path selects.
_FAST_LAUNCH_WORKER = """
import torch
from benchmarks import host
assert host.stub_triton_launches() is None
from seqrec_kernels.triton import _launch, softmax_loss

kernel = softmax_loss._compact_rows_kernel
base = {dtype: torch.arange(64, dtype=dtype) for dtype in (torch.int32, torch.int64)}
variants = []
for dtype in (torch.int32, torch.int64):
    for offset in (0, 1, 4):  # 16-byte aligned or not, by dtype
        for num_rows in (1, 16, 17, 2**31 + 16):  # 1, divisible by 16, neither, a 64-bit int
            for ignore_index in (0, -100):
                ids = base[dtype][offset:]
                args = (ids, torch.empty(8, dtype=torch.int32), torch.empty(8, dtype=torch.int32), num_rows, 30,
                        16, 1, ignore_index)
                variants.append(args)
checked = 0
for args in variants * 2:  # the second round runs from the cache
    ours = _launch.launch_kernel(kernel, (1,), *args, SEGMENT=16, num_warps=4)
    tritons = kernel.run(*args, grid=(1,), warmup=True, SEGMENT=16, num_warps=4)
    assert ours is tritons, (args[0].dtype, args[0].data_ptr() % 16, args[3:])
    checked += 1
print(checked, len({id(compiled) for compiled, _ in _launch._compiled.values()}))
"""


def test_fast_launch_selects_the_kernel_triton_selects():
    """launch_kernel's cache key is at least as fine as Triton's specialization: for pointers
    aligned or not, ints equal to 1, divisible by 16 or not, 32- or 64-bit, each launch (first
    through Triton, then from the cache) runs the very CompiledKernel Triton selects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _FAST_LAUNCH_WORKER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checked, distinct = map(int, result.stdout.split())
    assert checked == 96 and distinct == 32  # 2 dtypes x 2 alignments x 4 int classes x 2: each told apart


def test_host_benchmark_runs(tmp_path):
    """python -m benchmarks host writes rows beside torch's counterpart (here the providers that
    need no compiled Triton kernels: in this process Triton runs in its interpreter)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    host = importlib.import_module("benchmarks.host")
    threads = torch.get_num_threads()  # the benchmark runs single-threaded: give the rest back
    try:
        csv = str(tmp_path / "results.csv")
        rows = host.main(["--quick", "--shapes", "sampled", "--providers", "cpp,torch", "--csv", csv])
    finally:
        torch.set_num_threads(threads)
    by_provider = {(r.mode, r.provider): r for r in rows}
    assert {p for _, p in by_provider} == {"cpp", "torch"}
    assert all(r.ms is not None and r.ms > 0 for r in rows)
    assert by_provider[("forward+backward", "cpp")].goal.startswith("host time <= 1.5x cross_entropy")


def test_device_error_flags_survive_inference_mode(device_path):
    """A flag first set under torch.inference_mode is updated by later calls outside it."""
    call = _calls("triton", "seq_lens")["fused_attention"]
    with torch.inference_mode():
        sk.fused_attention(*(torch.randn(1, 1, 4, 16) for _ in "qkv"), seq_lens=torch.tensor([2]), backend="triton")
    call()
    with pytest.raises(ValueError, match=r"^seq_lens: expected values in \[0, 9\] \(L\), got values outside"):
        sk.check()
