"""The host path of every op (docs/host-path.md): the lean eager path computes what the custom
op computes; no host read of an index value on the path device tensors take, invalid values
there reported by seqrec_kernels.check(); compiled Triton kernels launched from a cache that
selects the kernel Triton selects; excluded ids built once; the host benchmark runs.

On a CPU the tests' tensors stand in for device tensors: `values_on_host` (the one place that
decides whether reading values is free) is patched to say no, so that the ops take the path
CUDA tensors take. Timings are the benchmark's business (python -m benchmarks host), not
these tests'."""

import importlib
import itertools
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
from backends_under_test import GPU_CUDA
from seqrec_kernels import _checks
from seqrec_kernels.ops import _front, _library
from seqrec_kernels.triton import attention as triton_attention
from seqrec_kernels.triton._launch import BoundLaunch, cached_plan

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
    the eager path (its autograd node is the eager Function's). cpp without its C++ front
    (tested below)."""
    monkeypatch.setattr(_front, "front_checks", lambda *args: None)
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


# ------------------------------------------------------------------ the C++ front (cpp, cuda, triton)
# The public functions' eager calls on the extension's backends run in C++ (csrc/front.cpp),
# which either computes what the general path computes or declines, leaving the general path
# to raise its error. Three entry points per call: the front, the general eager path (the front
# refused: _front.front_checks patched), the custom op (_eager_possible patched, which the front obeys).
ENTRY_POINTS = ("front", "general eager", "custom op")
FRONT_OPS = ("fused_attention", "fused_attention_varlen", "sampled_softmax_loss", "full_softmax_loss")


def _entry_point(monkeypatch, entry):
    monkeypatch.undo()
    if entry != "front":
        monkeypatch.setattr(_front, "front_checks", lambda *args: None)
    if entry == "custom op":
        monkeypatch.setattr(_library, "_eager_possible", lambda first: False)


def _front_cases(backend="cpp", device="cpu"):
    """name -> (run(): the public call on `backend`, its differentiable inputs, on `device`)."""
    on = dict(device=device)
    q, k, v = (torch.randn(3, 2, 9, 16, **on, requires_grad=True) for _ in "qkv")
    packed = [torch.randn(21, 2, 24, **on, requires_grad=True) for _ in "qkv"]
    strided = torch.randn(21, 2, 48, **on, requires_grad=True)  # packed q with stride 2 on D: copied
    cu_seqlens = torch.tensor([0, 9, 9, 17], **on)  # an empty sequence, a padding tail of 4 rows
    hidden, weight = torch.randn(2, 7, 16, **on, requires_grad=True), torch.randn(30, 16, **on, requires_grad=True)
    targets = torch.randint(0, 30, (2, 7), **on)
    targets[0, :3] = 0  # ignored rows
    neg = {"[K]": torch.randint(1, 30, (5,), **on), "[B, K]": torch.randint(1, 30, (2, 5), **on),
           "[B, L, K]": torch.randint(1, 30, (2, 7, 5), **on)}  # fmt: skip
    log_q = torch.randn(2, 7, 5, **on)
    lens = torch.tensor([9, 4, 0], **on)
    cases = {
        "padded, all L": (lambda: sk.fused_attention(q, k, v, backend=backend), (q, k, v)),
        "padded left, lse": (
            lambda: sk.fused_attention(q, k, v, seq_lens=lens, backend=backend, return_lse=True),
            (q, k, v),
        ),  # fmt: skip
        "padded right, int32, scale": (
            lambda: sk.fused_attention(q, k, v, seq_lens=lens.int(), padding_side="right", scale=0.3, backend=backend),
            (q, k, v),
        ),
        "padded, not causal, dropout": (
            lambda: sk.fused_attention(q, k, v, seq_lens=lens, causal=False, dropout_p=0.3, backend=backend),
            (q, k, v),
        ),
        "packed, lse, dropout": (
            lambda: sk.fused_attention_varlen(*packed, cu_seqlens, 10, dropout_p=0.2, backend=backend, return_lse=True),
            packed,
        ),
        "packed, int32, strided": (
            lambda: sk.fused_attention_varlen(
                strided[..., ::2], *packed[1:], cu_seqlens.int(), 9, causal=False, backend=backend
            ),  # fmt: skip
            (strided, *packed[1:]),
        ),
        "sampled [K], 3-D": (
            lambda: sk.sampled_softmax_loss(hidden, weight, targets, neg["[K]"], backend=backend),
            (hidden, weight),
        ),  # fmt: skip
        "sampled [B, K], sum": (
            lambda: sk.sampled_softmax_loss(hidden, weight, targets, neg["[B, K]"], reduction="sum", backend=backend),
            (hidden, weight),
        ),
        "sampled [T, K], none, log_q, int32": (
            lambda: sk.sampled_softmax_loss(
                hidden.flatten(0, 1),
                weight,
                targets.flatten().int(),
                neg["[B, L, K]"].flatten(0, 1),
                pos_log_q=log_q[..., 0].flatten(),
                neg_log_q=log_q.flatten(0, 1),
                remove_accidental_hits=False,
                temperature=0.7,
                ignore_index=-100,
                reduction="none",
                backend=backend,
            ),
            (hidden, weight),
        ),  # fmt: skip
        "full, mean, lse": (
            lambda: sk.full_softmax_loss(hidden, weight, targets, backend=backend, return_lse=True),
            (hidden, weight),
        ),  # fmt: skip
        "full, excluded, none": (
            lambda: sk.full_softmax_loss(
                hidden,
                weight,
                targets.clamp(max=24),
                exclude_items=[29, 0, 25],
                reduction="none",
                temperature=2.0,
                backend=backend,
            ),  # fmt: skip
            (hidden, weight),
        ),
        "full 2-D, sum, int32": (
            lambda: sk.full_softmax_loss(
                hidden[1], weight, targets[1].clamp(min=1).int(), ignore_index=-1, reduction="sum", backend=backend
            ),  # fmt: skip
            (hidden, weight),
        ),
    }
    return cases


def _run_entry(run, inputs, seed):
    torch.manual_seed(seed)  # the same dropout mask through every entry point
    out = run()
    return _outputs_and_grads(lambda: out, inputs), _front_node_name(out)


@pytest.mark.parametrize("mode", ["plain", "autocast bfloat16", "medium float32 precision", "device path"])
@pytest.mark.parametrize("case", sorted(_front_cases()))
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_front_computes_what_the_general_path_computes(backend, case, mode, monkeypatch, fresh_seed):
    """Bitwise the same outputs (dtypes, shapes) and gradients through the front, the general
    eager path and the custom op, with the front's node (or a view of its output) in the graph;
    also where index values stay on the device (the front's tensor-op branch; on Triton the same
    C++ as on cpp, not rerun in the interpreter)."""
    if backend == "triton" and mode == "device path":
        pytest.skip("the device path's C++ is the same on every backend: tested on cpp")
    run, inputs = _front_cases(backend)[case]
    results = {}
    precision = torch.get_float32_matmul_precision()
    try:
        if mode == "medium float32 precision":
            torch.set_float32_matmul_precision("medium")
        for entry in ENTRY_POINTS:
            _entry_point(monkeypatch, entry)
            if mode == "device path":  # index tensors as on a device: rows, counts and checks by tensor ops
                monkeypatch.setattr(_checks, "values_on_host", lambda values: False)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast bfloat16"):
                results[entry] = _run_entry(run, inputs, fresh_seed)
    finally:
        torch.set_float32_matmul_precision(precision)
        monkeypatch.undo()
        _checks._device_errors.clear()
    front, taken = results["front"]
    assert "seqrec::" in taken  # the front's node, not a general path's
    for entry in ENTRY_POINTS[1:]:
        other, taken = results[entry]
        assert "seqrec::" not in taken
        assert len(front) == len(other)
        for a, b in zip(front, other):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), entry
    if mode == "autocast bfloat16":
        assert front[0].dtype == (torch.bfloat16 if case.startswith(("padded", "packed")) else torch.float32)


LAUNCHERS = {"attention": ("attention_forward", "attention_backward"),
             "softmax_loss": ("sampled_forward", "sampled_backward", "full_forward", "full_backward")}  # fmt: skip


def _layout(arg):
    """A launcher argument as a kernel sees it: a tensor's shape, dtype and strides (but those
    of size-1 dimensions, which address nothing), any other value as it is."""
    if not isinstance(arg, torch.Tensor):
        return arg
    return tuple(arg.shape), arg.dtype, tuple(None if n == 1 else st for n, st in zip(arg.shape, arg.stride()))


def _recording(launcher, name, calls):
    def record(*args):
        calls.append((name, [_layout(a) for a in args]))
        return launcher(*args)

    return record


@pytest.mark.parametrize("case", sorted(_front_cases()))
def test_front_hands_the_triton_launchers_what_the_general_path_does(case, monkeypatch):
    """Through the front the Triton launchers get the arguments of the general path: shapes,
    strides and dtypes of the tensors, the other values. A kernel is compiled (and tuned) per
    specialization of its arguments, so a layout only the front hands over (a contiguous loss
    gradient where the general path's is a stride-0 expand) is a kernel variant no other test
    compiles: one spilled registers on sm_80."""
    calls = {}
    for entry in ("front", "general eager"):
        _entry_point(monkeypatch, entry)
        calls[entry] = []
        for module_name, names in LAUNCHERS.items():
            module = importlib.import_module(f"seqrec_kernels.triton.{module_name}")
            for name in names:
                monkeypatch.setattr(module, name, _recording(getattr(module, name), name, calls[entry]))
        run, inputs = _front_cases("triton")[case]
        torch.manual_seed(0)
        _outputs_and_grads(run, inputs)
    monkeypatch.undo()
    assert calls["front"] and calls["front"] == calls["general eager"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", GPU_CUDA])
def test_front_on_a_gpu_computes_what_the_general_path_computes(backend, monkeypatch, fresh_seed):
    """On CUDA tensors: bitwise the same outputs and gradients through the front (its node in
    the graph), the general eager path and the custom op, for every case of the CPU test, plain
    and under "medium" float32 precision (where the extension's operands are cast, Triton's not)."""
    precision = torch.get_float32_matmul_precision()
    for case, mode in itertools.product(sorted(_front_cases()), ("highest", "medium")):
        run, inputs = _front_cases(backend, "cuda")[case]
        results = {}
        try:
            torch.set_float32_matmul_precision(mode)
            for entry in ENTRY_POINTS:
                _entry_point(monkeypatch, entry)
                results[entry] = _run_entry(run, inputs, fresh_seed)
        finally:
            torch.set_float32_matmul_precision(precision)
            monkeypatch.undo()
            _checks._device_errors.clear()
        front, taken = results["front"]
        assert "seqrec::" in taken, (case, mode)
        for entry in ENTRY_POINTS[1:]:
            other, _ = results[entry]
            for a, b in zip(front, other, strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (case, mode, entry)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", GPU_CUDA])
def test_front_on_a_gpu_never_syncs(backend):
    """Every front case forward and backward on CUDA tensors under
    torch.cuda.set_sync_debug_mode("error"): a host sync anywhere on the default path (an index
    value read, a pageable copy, a count) raises. The device flags are checked afterwards."""
    cases = _front_cases(backend, "cuda")
    for run, _ in cases.values():  # warm-up: Triton compiles, tuning tables load
        _run_and_backward(run)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for run, _ in cases.values():
            _run_and_backward(run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sk.check()  # valid values: nothing to raise


def _run_and_backward(run):
    out = run()
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()


def _front_node_name(out) -> str:
    """The name of the seqrec node behind a front call's output ('' if none)."""
    node = (out[0] if isinstance(out, tuple) else out).grad_fn
    while node is not None and "seqrec::" not in node.name() and node.next_functions:
        node = node.next_functions[0][0]
    return node.name() if node is not None else ""


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_front_takes_the_plain_calls(backend, monkeypatch):
    """A plain eager call on 'cpp' or 'triton' has the front's node; a call under torch.no_grad no node."""
    for case, (run, _inputs) in _front_cases(backend).items():
        assert _front_node_name(run()).startswith("torch::autograd::CppNode<seqrec::"), case
        with torch.no_grad():
            assert (run()[0] if isinstance(run(), tuple) else run()).grad_fn is None


def _call_error(call):
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return None


def _bad_calls():
    """name -> a call with one invalid argument (on 'cpp', CPU tensors)."""
    q, k, v = (torch.randn(2, 1, 6, 8) for _ in "qkv")
    packed = [torch.randn(10, 1, 8) for _ in "qkv"]
    hidden, weight = torch.randn(2, 5, 8), torch.randn(12, 8)
    targets, neg_ids = torch.randint(1, 12, (2, 5)), torch.randint(1, 12, (2, 3))

    def attention(**kwargs):
        args = dict(q=q, k=k, v=v, backend="cpp")
        args.update(kwargs)
        operands = [args.pop(name) for name in "qkv"]
        return lambda: sk.fused_attention(*operands, **args)

    def varlen(offsets=(0, 4, 10), max_seqlen=6, qkv=packed):
        cu = offsets if isinstance(offsets, torch.Tensor) else torch.tensor(offsets)
        return lambda: sk.fused_attention_varlen(*qkv, cu, max_seqlen, backend="cpp")

    def sampled(**kwargs):
        args = dict(hidden=hidden, item_weight=weight, pos_ids=targets, neg_ids=neg_ids, backend="cpp")
        args.update(kwargs)
        return lambda: sk.sampled_softmax_loss(**args)

    def full(**kwargs):
        args = dict(hidden=hidden, item_weight=weight, targets=targets, backend="cpp")
        args.update(kwargs)
        return lambda: sk.full_softmax_loss(**args)

    return {
        "q 3-D": attention(q=q[0]), "q float64": attention(q=q.double(), k=k.double(), v=v.double()),
        "q int": attention(q=q.int(), k=k.int(), v=v.int()), "q a list": attention(q=[1.0]),
        "k shape": attention(k=k[:, :, :5]), "v dtype": attention(v=v.half()), "k a list": attention(k=[1.0]),
        "head dim 300": attention(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300),
                                  v=torch.randn(1, 1, 2, 300)),  # fmt: skip
        "causal int": attention(causal=1), "dropout 1": attention(dropout_p=1.0),
        "dropout -0.1": attention(dropout_p=-0.1), "dropout nan": attention(dropout_p=float("nan")),
        "dropout bool": attention(dropout_p=False), "scale inf": attention(scale=float("inf")),
        "scale str": attention(scale="0.5"), "padding_side": attention(padding_side="top"),
        "return_lse int": attention(return_lse=1), "seq_lens float": attention(seq_lens=torch.tensor([1.0, 2.0])),
        "seq_lens 2-D": attention(seq_lens=torch.tensor([[1, 2]])), "seq_lens B": attention(seq_lens=torch.tensor([1])),
        "seq_lens > L": attention(seq_lens=torch.tensor([7, 2])),
        "seq_lens < 0": attention(seq_lens=torch.tensor([-1, 2])),
        "seq_lens a list": attention(seq_lens=[1, 2]), "backend": attention(backend="cppp"),
        "cu_seqlens one": varlen((0,)), "cu_seqlens float": varlen(torch.tensor([0.0, 4.0])),
        "cu_seqlens from 1": varlen((1, 4)), "cu_seqlens decreasing": varlen((0, 5, 4)),
        "cu_seqlens past T": varlen((0, 11)), "longer than max_seqlen": varlen(max_seqlen=5),
        "max_seqlen -1": varlen(max_seqlen=-1), "max_seqlen bool": varlen(max_seqlen=True),
        "max_seqlen float": varlen(max_seqlen=6.0), "packed q 4-D": varlen(qkv=[q, k, v]),
        "hidden 1-D": sampled(hidden=hidden[0, 0]), "hidden float64": sampled(hidden=hidden.double(),
                                                                              item_weight=weight.double()),  # fmt: skip
        "weight dtype": sampled(item_weight=weight.half()), "weight D": sampled(item_weight=weight[:, :7]),
        "weight no rows": sampled(item_weight=weight[:0]), "weight 1-D": full(item_weight=weight[0]),
        "hidden D 1025": sampled(hidden=torch.randn(2, 5, 1025), item_weight=torch.randn(12, 1025)),
        "temperature 0": sampled(temperature=0.0), "temperature inf": sampled(temperature=float("inf")),
        "temperature bool": full(temperature=True), "ignore_index float": sampled(ignore_index=0.0),
        "reduction": full(reduction="avg"), "reduction a list": sampled(reduction=["mean"]),
        "remove hits int": sampled(remove_accidental_hits=1), "pos_ids shape": sampled(pos_ids=targets[0]),
        "pos_ids float": sampled(pos_ids=targets.float()), "pos_ids >= N": sampled(pos_ids=targets + 11),
        "neg_ids shape": sampled(neg_ids=neg_ids[:1]), "neg_ids K 0": sampled(neg_ids=neg_ids[:, :0]),
        "neg_ids < 0": sampled(neg_ids=-neg_ids), "pos_log_q shape": sampled(pos_log_q=torch.randn(10)),
        "neg_log_q int": sampled(neg_log_q=neg_ids), "targets >= N": full(targets=targets + 11),
        "targets excluded": full(targets=targets.index_fill(1, torch.tensor([2]), 5), exclude_items=(0, 5)),
        "exclude_items >= N": full(exclude_items=(12,)), "exclude_items all": full(exclude_items=range(12)),
        "exclude_items int": full(exclude_items=5), "full return_lse int": full(return_lse=1),
    }  # fmt: skip


@pytest.mark.parametrize("bad", sorted(_bad_calls()))
def test_front_leaves_bad_input_to_the_general_path(bad, monkeypatch):
    """Every invalid argument raises the general path's error, the same type and message, and
    the front draws no random numbers before it declines."""
    call = _bad_calls()[bad]
    state = torch.get_rng_state()
    with_front = _call_error(call)
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(_front, "front_checks", lambda *args: None)
    without_front = _call_error(call)
    assert without_front is not None and with_front == without_front


def test_front_reads_no_index_value_on_the_device_path(device_path):
    """On the device path the front checks index values on the device: no host read, a flag
    per checked argument, nothing for check() to raise on valid values."""
    calls = _calls("cpp")
    with HostReadCounter() as counter:
        for op_name in FRONT_OPS:
            calls[op_name]()
    assert counter.reads == []
    assert {name for name, _ in _checks._device_errors} == {"seq_lens", "cu_seqlens", "pos_ids", "neg_ids", "targets"}
    sk.check()


@pytest.fixture
def item_id_checks_off():
    """The cpp ops' own host check of item ids off: they mask out-of-range ids as the CUDA
    kernels do (on a device nothing reads the ids on the host)."""
    torch.ops.seqrec._set_item_id_checks(False)
    yield
    torch.ops.seqrec._set_item_id_checks(True)


@pytest.mark.parametrize("bad", ["cu_seqlens", "pos_ids", "neg_ids", "targets"])
def test_front_flags_invalid_device_values(bad, device_path, item_id_checks_off):
    """Invalid index values on the device path: the call returns, check() raises the general
    path's error once; value_checks(False) checks nothing. (Invalid seq_lens, or cu_seqlens past
    T, make the cpp op itself raise on CPU tensors: its sequence rows are checked on the host.)"""
    op_name, message = BAD[bad]
    if bad == "cu_seqlens":  # offsets not from 0: sequences inside T, which the cpp op accepts
        packed = [torch.randn(20, 2, 16, requires_grad=True) for _ in "qkv"]
        run = lambda: sk.fused_attention_varlen(*packed, torch.tensor([1, 9, 16]), 9, backend="cpp")  # noqa: E731
    else:
        run = _calls("cpp", bad)[op_name]
    run()
    with pytest.raises(ValueError, match=r"^" + re.escape(message)):
        sk.check()
    sk.check()
    with sk.value_checks(False):
        run()
    sk.check()


# Issue 24, launch plans: a worker as above, launching through a BoundLaunch (its grid and
# trailing scalars bound) instead; each launch is compared with what Triton's generic path selects.
_BOUND_LAUNCH_WORKER = """
import torch
from benchmarks import host
assert host.stub_triton_launches() is None
from seqrec_kernels.triton import _launch, softmax_loss

kernel = softmax_loss._compact_rows_kernel
base = {dtype: torch.arange(64, dtype=dtype) for dtype in (torch.int32, torch.int64)}
launches = {scalars: _launch.BoundLaunch(kernel, (1,), scalars, dict(SEGMENT=16, num_warps=4))
            for scalars in [(1, 30, 16, 1, 0), (17, 30, 16, 1, -100)]}
checked = 0
for round in range(2):  # the second round runs from each BoundLaunch's own cache
    for scalars, launch in launches.items():
        for dtype in (torch.int32, torch.int64):
            for offset in (0, 1, 4):  # 16-byte aligned or not, by dtype
                for order_offset in (0, 1):
                    tensors = (base[dtype][offset:], torch.empty(9, dtype=torch.int32)[order_offset:],
                               torch.empty(8, dtype=torch.int32))
                    ours = launch(*tensors)
                    tritons = kernel.run(*tensors, *scalars, grid=(1,), warmup=True, SEGMENT=16, num_warps=4)
                    assert ours is tritons, (dtype, offset, order_offset, scalars)
                    checked += 1
print(checked, sum(len(launch._compiled) for launch in launches.values()))
"""


def test_bound_launch_selects_the_kernel_triton_selects():
    """A BoundLaunch keys compiled kernels by its tensors alone (dtype, 16-byte alignment), its
    scalars being fixed: for each, the first launch (through Triton) and the cached ones run the
    very CompiledKernel Triton selects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _BOUND_LAUNCH_WORKER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checked, cached = map(int, result.stdout.split())
    assert checked == 48 and cached == 2 * 2 * 2 * 2  # per BoundLaunch: 2 dtypes x 2 alignments x 2 of order


def _plan_parts(plan):
    """A launch plan as comparable values: each BoundLaunch as (kernel, grid, scalars, meta)."""
    if isinstance(plan, BoundLaunch):
        return plan.kernel, plan.grid, plan.scalars, plan.meta
    if isinstance(plan, (tuple, list)):
        return tuple(_plan_parts(part) for part in plan)
    return plan


def test_cached_attention_plans_are_what_a_fresh_build_gives():
    """Calls that differ in one thing a plan depends on (layout of q or of k, sequences, max_seqlen,
    causal, scale, dropout, dout's layout, deterministic mode) each get the plan built for them,
    not one cached for another: the plan keys hold everything the plans derive from."""
    qkv = [torch.randn(3, 2, 70, 20) for _ in "qkv"]
    transposed = torch.randn(3, 70, 2, 20).transpose(1, 2)  # [B, H, L, D] view of a [B, L, H, D] tensor
    packed = [t[:1] for t in qkv]  # one batch row holding 3 sequences
    variants = [
        (qkv, 3, 70, True, 0.25, 0.0),
        ((transposed, *qkv[1:]), 3, 70, True, 0.25, 0.0),
        ((qkv[0], transposed, qkv[2]), 3, 70, True, 0.25, 0.0),
        (packed, 3, 30, True, 0.25, 0.0),
        (qkv, 3, 30, True, 0.25, 0.0),
        (qkv, 3, 70, False, 0.25, 0.0),
        (qkv, 3, 70, True, 0.5, 0.0),
        (qkv, 3, 70, True, 0.25, 0.3),
    ]
    dout_layouts = [torch.randn(3, 2, 70, 20), torch.randn(3, 70, 2, 20).transpose(1, 2)]
    checked = 0
    for _ in range(2):  # the second round from the caches
        for (q, k, v), *options in variants:
            out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
            key = triton_attention._plan_key(q, k, v, *options)
            cached = cached_plan(triton_attention._forward_plans, key, triton_attention._forward_plan,
                                 q, k, v, out, lse, *options)  # fmt: skip
            fresh = triton_attention._forward_plan(q, k, v, out, lse, *options)
            assert _plan_parts(cached) == _plan_parts(fresh), options
            for dout in dout_layouts:
                dout = dout[: q.shape[0]]
                for deterministic in (False, True):
                    grads = [torch.empty_like(t) for t in (q, k, v)]
                    plan_args = (q, k, v, dout, out, lse, *grads, *options, deterministic)
                    bwd_key = (*key, dout.stride(), out.stride(), lse.stride(), deterministic)
                    cached = cached_plan(triton_attention._backward_plans, bwd_key, triton_attention._backward_plan,
                                         *plan_args)  # fmt: skip
                    assert _plan_parts(cached) == _plan_parts(triton_attention._backward_plan(*plan_args)), options
                    checked += 1
    assert checked == 2 * len(variants) * 4


@pytest.mark.parametrize("entry", ENTRY_POINTS[:2])
def test_front_outputs_modified_in_place_as_the_general_paths(entry, monkeypatch):
    """The packed output is modifiable in place (no view made inside the node), and autograd
    then refuses the backward that needs it, as it does on the general path."""
    _entry_point(monkeypatch, entry)
    packed = [torch.randn(12, 2, 16, requires_grad=True) for _ in "qkv"]
    out = sk.fused_attention_varlen(*packed, torch.tensor([0, 5, 12]), 7, backend="cpp")
    out.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # A saved input changed in place before the backward: refused too (the front saves a view of
    # it made inside the node, which autograd names as such).
    q, k, v = (t * 1.0 for t in packed)
    out = sk.fused_attention_varlen(q, k, v, torch.tensor([0, 5, 12]), 7, backend="cpp")
    k.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified inplace"):
        out.sum().backward()
