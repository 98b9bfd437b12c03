"""The GPU check's correctness sweep: every public op x kernel backend x dtype (float32 in
each matmul precision mode, float16, bfloat16), forward and backward, on small odd shapes,
against the float64 truth, in one process. A miss never stops the sweep; each case writes
one line as it finishes and a summary table closes the file.

    python tests/gpu_sweep.py [--device cuda|cpu] [--out FILE] [--smoke]

The rule is the tests' own: attention through attention_helpers.check_against_truth, the
losses through loss_helpers.check_loss_against_truth (kernel error at most 2x, gradients 3x,
the naive same-dtype computation's error against float64, plus the tests' floor), retrieval
exact on integer-valued inputs. float32 under "high" / "medium" (3xTF32 / bfloat16 products)
follows the GPU precision test: within 3x the error of the reference in float32 IEEE /
bfloat16. On CUDA each op also runs once under torch.cuda.set_sync_debug_mode("error"): a
host synchronization in its default path fails the case.

--device cpu runs the same cases on the CPU backends (Triton's interpreter, the extension's
C++ path), which is how `make test` dry-runs this script; --smoke keeps the first case of
each (op, backend) group.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests' helpers, as a script

import attention_helpers  # noqa: E402
import loss_helpers  # noqa: E402
import seqrec_kernels as sk  # noqa: E402

BASE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Case:
    """One check: `run()` raises AssertionError on a tolerance miss."""

    def __init__(self, op, backend, name, run):
        self.op, self.backend, self.name, self.run = op, backend, name, run


@contextlib.contextmanager
def matmul_precision(mode):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class ErrorLog:
    """Records (name, max error, naive error) of every comparison the tests' rule makes, so that
    a passing case reports its numbers too (the rule itself only raises on a miss)."""

    def __init__(self):
        self.entries = []
        self._rule = attention_helpers.assert_flash_rule

    def rule(self, name, actual, truth, baseline, *rule_args, **rule_kwargs):
        error = (actual.double() - truth.double()).abs().max().item() if truth.numel() else 0.0
        naive = (baseline.double() - truth.double()).abs().max().item() if truth.numel() else 0.0
        self.entries.append(f"{name} {error:.2e} (naive {naive:.2e})")
        return self._rule(name, actual, truth, baseline, *rule_args, **rule_kwargs)

    @contextlib.contextmanager
    def installed(self):
        patched = [m for m in (attention_helpers, loss_helpers) if hasattr(m, "assert_flash_rule")]
        for module in patched:
            module.assert_flash_rule = self.rule
        try:
            yield self
        finally:
            for module in patched:
                module.assert_flash_rule = self._rule


# ------------------------------------------------------------------------------ the rule for "high"/"medium"


def precision_mode_check(op, inputs, backend, mode):
    """float32 inputs under `mode` vs float64: each output within 3x the error of the reference
    in float32 IEEE ("high") or bfloat16 ("medium"), plus 1e-5 of the truth's largest value."""
    upstream = {}

    def run(backend, dtype, precision):
        with matmul_precision(precision):
            leaves = [t.to(dtype, copy=True).requires_grad_() for t in inputs]
            out = op(*leaves, backend=backend)
            upstream.setdefault("grad", torch.randn(out.shape, dtype=torch.float64, device=out.device))
            (out.double() * upstream["grad"]).sum().backward()
            return [out.detach().double(), *(t.grad.double() for t in leaves)]

    truth = run("reference", torch.float64, "highest")
    baseline = run("reference", torch.float32 if mode == "high" else torch.bfloat16, "highest")
    got = run(backend, torch.float32, mode)
    lines = []
    for i, (g, b, t) in enumerate(zip(got, baseline, truth)):
        error, allowed = (g - t).abs().max().item(), 3 * (b - t).abs().max().item() + 1e-5 * t.abs().max().item()
        lines.append(f"output {i} {error:.2e} (allowed {allowed:.2e})")
        assert error <= allowed, f"output {i}: error {error:.3g} > allowed {allowed:.3g}"
    return lines


# ------------------------------------------------------------------------------ cases


def attention_cases(backends, device, small):
    batch, heads, length, head_dim = (3, 2, 9, 5) if small else (3, 2, 37, 50)
    seq_lens = torch.tensor([length, length // 3, 0], device=device)

    def padded(dtype, side, varlen, causal=True, dropout_p=0.0, length=length, head_dim=head_dim, seq_lens=seq_lens):
        def run(backend):
            q, k, v = (t.to(device) for t in attention_helpers.make_qkv(batch, heads, length, head_dim, dtype))
            attention_helpers.check_against_truth(
                q, k, v, seq_lens, side, causal, backend, dropout_p=dropout_p, varlen=varlen, tail=3 if varlen else 0
            )

        return run

    variants = []
    for dtype_name in ("float32", "float16", "bfloat16"):
        for side, varlen in (("left", False), ("right", False), ("right", True)):
            layout = "varlen" if varlen else f"padded-{side}"
            variants.append((f"{dtype_name} {layout} D={head_dim}", padded(BASE_DTYPES[dtype_name], side, varlen)))
    long_length, wide = (20, 40) if small else (150, 128)
    long_lens = torch.tensor([long_length, 1, long_length - 7], device=device)
    variants += [
        ("bfloat16 padded-left dropout=0.2", padded(torch.bfloat16, "left", False, dropout_p=0.2)),
        ("bfloat16 varlen dropout=0.2", padded(torch.bfloat16, "right", True, dropout_p=0.2)),
        ("bfloat16 padded-right non-causal", padded(torch.bfloat16, "right", False, causal=False)),
        (f"bfloat16 padded-left D={wide} L={long_length}",
         padded(torch.bfloat16, "left", False, length=long_length, head_dim=wide, seq_lens=long_lens)),
        (f"float16 varlen D={head_dim} L={long_length}",
         padded(torch.float16, "right", True, length=long_length, seq_lens=long_lens)),
    ]  # fmt: skip

    def fp32_mode(mode):
        inputs = [torch.randn(batch, heads, length, head_dim, device=device) for _ in range(3)]
        op = functools.partial(sk.fused_attention, seq_lens=seq_lens)
        return lambda backend: precision_mode_check(op, inputs, backend, mode)

    variants += [(f"float32-{mode} padded-left D={head_dim}", fp32_mode(mode)) for mode in ("high", "medium")]
    return [Case("fused_attention", b, name, functools.partial(run, b)) for b in backends for name, run in variants]


def loss_cases(backends, device, small):
    batch, length, dim, num_items, num_neg = (2, 5, 6, 41, 7) if small else (3, 37, 50, 1001, 129)

    def operands(dtype):
        hidden = torch.randn(batch, length, dim, device=device).to(dtype)
        weight = (torch.randn(num_items, dim, device=device) * 0.3).to(dtype)
        targets = torch.randint(0, num_items, (batch, length), device=device)  # some 0: ignored rows
        return hidden, weight, targets

    def sampled(dtype, neg_shape, log_q=False):
        def run(backend):
            hidden, weight, targets = operands(dtype)
            neg_ids = torch.randint(1, num_items, neg_shape, device=device)
            options = {}
            if log_q:
                options = dict(pos_log_q=torch.rand(batch, length, device=device),
                               neg_log_q=torch.rand(neg_shape, device=device))  # fmt: skip
            ours, naive = loss_helpers.sampled_pair(backend, targets, neg_ids, **options)
            loss_helpers.check_loss_against_truth(ours, naive, hidden, weight)

        return run

    def full(dtype, excluded):
        def run(backend):
            hidden, weight, targets = operands(dtype)
            is_excluded = torch.isin(targets, torch.tensor(excluded, device=device)) & (targets != 0)
            targets = torch.where(is_excluded, targets + 1, targets)  # excluded items are never targets
            ours, naive = loss_helpers.full_pair(backend, targets, excluded=excluded)
            loss_helpers.check_loss_against_truth(ours, naive, hidden, weight)

        return run

    layouts = {"shared [K]": (num_neg,), "per sequence [B, K]": (batch, num_neg), "per row [B, L, K]": (
        batch, length, num_neg)}  # fmt: skip
    sampled_variants = [
        (f"{name} {layout}", sampled(BASE_DTYPES[name], shape)) for name in ("float32", "bfloat16")
        for layout, shape in layouts.items()
    ]  # fmt: skip
    sampled_variants.append(("bfloat16 shared [K] log_q", sampled(torch.bfloat16, (num_neg,), log_q=True)))
    many_excluded = tuple(range(0, 24, 2))  # 12 > 8 ids: the kernels' catalog-mask path
    full_variants = [
        (f"{name} excluded={len(excluded)}", full(BASE_DTYPES[name], excluded)) for name in ("float32", "bfloat16")
        for excluded in ((0,), many_excluded)
    ]  # fmt: skip

    def fp32_mode(op_name, mode):
        hidden, weight, targets = operands(torch.float32)
        hidden = hidden.reshape(-1, dim)
        targets = targets.reshape(-1)
        if op_name == "sampled_softmax_loss":
            neg_ids = torch.randint(1, num_items, (num_neg,), device=device)
            op = functools.partial(sk.sampled_softmax_loss, pos_ids=targets, neg_ids=neg_ids, reduction="none")
        else:
            op = functools.partial(sk.full_softmax_loss, targets=targets, reduction="none")
        return lambda backend: precision_mode_check(op, [hidden, weight], backend, mode)

    cases = []
    for backend in backends:
        cases += [Case("sampled_softmax_loss", backend, name, functools.partial(run, backend))
                  for name, run in sampled_variants]  # fmt: skip
        cases += [
            Case("full_softmax_loss", backend, name, functools.partial(run, backend)) for name, run in full_variants
        ]
        for op_name in ("sampled_softmax_loss", "full_softmax_loss"):
            cases += [Case(op_name, backend, f"float32-{mode}", functools.partial(fp32_mode(op_name, mode), backend))
                      for mode in ("high", "medium")]  # fmt: skip
    return cases


def retrieval_cases(backends, device, small):
    """Integer-valued inputs: every backend scores exactly, so ids, scores and ranks must equal
    the float64 reference's on the CPU, tie rule included."""
    rows, num_items, dim, k = (3, 37, 8, 5) if small else (19, 3001, 50, 17)

    def run(op_name, dtype, backend):
        hidden = torch.randint(-2, 3, (rows, dim)).to(dtype)
        weight = torch.randint(-2, 3, (num_items, dim)).to(dtype)
        exclude = torch.randint(0, num_items, (rows, 4))
        targets = torch.randint(1, num_items, (rows,))

        def call(backend, device, dtype):
            args = [t.to(device, dtype) for t in (hidden, weight)]
            options = dict(exclude=exclude.to(device), backend=backend)
            if op_name == "topk_items":
                return sk.topk_items(*args, k, **options)
            return (sk.target_ranks(*args, targets.to(device), **options),)

        got = call(backend, device, dtype)
        expected = call("reference", "cpu", torch.float64)
        for name, g, e in zip(("scores/ranks", "ids"), got, expected):
            assert torch.equal(g.cpu().to(e.dtype), e), f"{op_name} {name} differ from the reference"

    return [
        Case(op_name, backend, f"{name} D={dim}", functools.partial(run, op_name, BASE_DTYPES[name], backend))
        for backend in backends if backend == "triton"  # the extension has no retrieval kernels (README)
        for op_name in ("topk_items", "target_ranks") for name in ("float32", "bfloat16")
    ]  # fmt: skip


def sync_cases(backends, device):
    """Each op's default path on device tensors under set_sync_debug_mode("error") (CUDA only)."""
    if device.type != "cuda":
        return []
    batch, length, dim, num_items = 8, 50, 50, 2000
    seq_lens = torch.randint(1, length + 1, (batch,), device=device)
    cu_seqlens = torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32)
    hidden = torch.randn(batch * length, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(num_items, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, num_items, (batch * length,), device=device)
    negatives = torch.randint(1, num_items, (64,), device=device)
    qkv = [torch.randn(batch, 1, length, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3)]  # fmt: skip
    packed = [torch.randn(batch * length, 1, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
              for _ in range(3)]  # fmt: skip
    calls = {
        "fused_attention": lambda b: sk.fused_attention(*qkv, seq_lens=seq_lens, backend=b).sum(),
        "fused_attention_varlen": lambda b: sk.fused_attention_varlen(*packed, cu_seqlens, length, backend=b).sum(),
        "sampled_softmax_loss": lambda b: sk.sampled_softmax_loss(hidden, weight, targets, negatives, backend=b),
        "full_softmax_loss": lambda b: sk.full_softmax_loss(hidden, weight, targets, backend=b),
    }

    def run(call, backend):
        call(backend).backward()  # compiled and warmed up (first calls may sync to load kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(backend).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return [Case(op, backend, "no host sync (bfloat16)", functools.partial(run, call, backend))
            for backend in backends for op, call in calls.items()]  # fmt: skip


# ------------------------------------------------------------------------------ driver


def run_case(case, errors):
    """(status, detail): PASS with the errors seen, FAIL with the rule's message, ERROR with
    the exception (an op that raised is a finding too)."""
    errors.entries.clear()
    try:
        lines = case.run()
    except AssertionError as error:
        return "FAIL", f"{error} | seen: {'; '.join(errors.entries)}"
    except Exception as error:  # noqa: BLE001 - every failure is reported, none stops the sweep
        where = traceback.extract_tb(error.__traceback__)[-1]
        return "ERROR", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} (at {where.name})"
    return "PASS", "; ".join(lines or errors.entries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the lines to this file")
    parser.add_argument("--smoke", action="store_true", help="the first case of each (op, backend) only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = ["triton", "cuda"] if device.type == "cuda" else ["triton", "cpp"]
    missing = [b for b in backends if b not in {x.value for x in sk.available(device)}]
    small = device.type == "cpu"
    seed = int(time.time()) % 2**31  # fresh inputs every run; the seed replays them
    torch.manual_seed(seed)
    cases = [
        *attention_cases(backends, device, small), *loss_cases(backends, device, small),
        *retrieval_cases(backends, device, small), *sync_cases(backends, device),
    ]  # fmt: skip
    firsts = {}  # the first case of each (op, backend): run first, so a time-out still covers every op
    for case in cases:
        firsts.setdefault((case.op, case.backend), case)
    rest = [case for case in cases if case not in firsts.values()]
    cases = list(firsts.values()) + ([] if args.smoke else rest)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 - written line by line as cases finish

    def emit(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    emit(f"# correctness sweep on {name}: torch {torch.__version__}, {len(cases)} cases, seed {seed}")
    for backend in missing:
        emit(f"UNAVAILABLE backend {backend}: its cases are reported as ERROR")
    totals = collections.defaultdict(collections.Counter)
    errors = ErrorLog()
    start = time.perf_counter()
    with errors.installed():
        for case in cases:
            begun = time.perf_counter()
            status, detail = run_case(case, errors)
            totals[(case.op, case.backend)][status] += 1
            seconds = time.perf_counter() - begun
            emit(f"{status:<5} {case.op:<22} {case.backend:<7} {case.name:<40} {seconds:6.2f}s  {detail}")
    emit(f"\n# summary ({time.perf_counter() - start:.0f} s)")
    emit(f"{'op':<24} {'backend':<8} {'PASS':>5} {'FAIL':>5} {'ERROR':>6}")
    for (op, backend), counts in totals.items():
        emit(f"{op:<24} {backend:<8} {counts['PASS']:>5} {counts['FAIL']:>5} {counts['ERROR']:>6}")
    bad = sum(c["FAIL"] + c["ERROR"] for c in totals.values())
    emit(f"{bad} of {len(cases)} cases missed" if bad else f"all {len(cases)} cases passed")
    if out:
        out.close()
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
