"""Compile every Triton kernel the public API launches for a real GPU, on a machine without one.

Triton's compiler needs a target, not a GPU. A worker process installs a driver stub that
reports `GPUTarget("cuda", CC, 32)` and turns every kernel launch into a compile-only
warm-up, then drives the public API (`fused_attention`, `fused_attention_varlen`, both
losses, forward and backward) over the issue's grid. Each kernel is therefore specialized
exactly as a real launch would specialize it (block sizes, constexprs, integer and
pointer divisibility). Its PTX and cubin (`cuobjdump -res-usage`; cuobjdump ships in the
triton wheel) give registers, local memory (spills), shared memory, the tensor-core
instructions, cp.async / TMA, load widths and atomic semantics.

    python tests/offline_compile.py                     # sm_80 and sm_90; exit 1 on a violation
    python tests/offline_compile.py --markdown benchmarks/results/offline-compile.md
    python tests/offline_compile.py --worker 90         # one target, JSON lines on stdout

`tests/test_offline_compile.py` runs the same check under pytest. float32 cases run once
per matmul precision mode (torch.set_float32_matmul_precision). What is asserted
(`violations`): every kernel compiles; no kernel spills, at any dtype, D or precision
mode; tile products use tensor-core MMA at 16-bit and at float32 "high"/"medium"; no
kernel's shared memory exceeds the target's per-block opt-in limit; 16-bit tile-product
kernels stream with cp.async/TMA and load no 16-bit element alone (any D, 50 included);
atomics are relaxed. Load widths are recorded.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (80, 90)
# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {80: 166_912, 90: 232_448}  # A100, H100/H200
# Kernels whose inner loops are tile products (tl.dot), hence must run on tensor cores at
# 16-bit. The per-row sampled layout multiplies row by row on CUDA cores by design.
TILE_PRODUCT_KERNELS = {
    "_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_fused_kernel",
    "_full_fwd_kernel", "_full_bwd_hidden_kernel", "_full_bwd_weight_kernel",
    "_sampled_fwd_kernel", "_sampled_bwd_kernel",
    "_topk_kernel", "_ranks_kernel",
}  # fmt: skip

# The grids: what the public API is called with (values never matter here). "full" is the
# product over every option (make offline-compile; the committed table); "ci" (make test-full)
# keeps every dtype, every block-size class and every code path (dropout and causal on and
# off, padded and packed, each negative layout, deterministic or not, 0/1/3/20 excluded items)
# but not their full product, so that both targets compile in minutes on 2 cores.
GRIDS = {
    "full": dict(
        attention_dims=(16, 32, 50, 64, 100, 128, 256),
        attention_variants=[(p, c, f) for p in (0.0, 0.2) for c in (True, False) for f in ("padded", "packed")],
        loss_dims=(50, 64, 128, 256, 512, 1024),
        sampled_variants=[(layout, det) for layout in ("shared", "per_sequence", "per_row") for det in (False, True)],
        excluded_counts=(0, 1, 3, 20),  # 20: beyond the ids held in registers, a catalog mask
        float32_precisions=("highest", "high", "medium"),
        retrieval_variants=[(d, k) for d in (50, 64, 128, 256, 512, 1024) for k in (10, 100, 1024, 2048)],
        candidate_dims={"attention": (50, 64, 128), "full_softmax": (50, 64)},
        # (dropout_p, causal, form) of the attention candidates: the tuning key has no dropout, so a
        # winner timed without it also runs SASRec's training calls (packed, with dropout)
        candidate_attention_variants=[(0.0, True, "padded"), (0.2, True, "packed")],
    ),
    "ci": dict(
        attention_dims=(16, 50, 128, 256),
        attention_variants=[(0.2, True, "padded"), (0.0, False, "packed")],
        loss_dims=(50, 128, 1024),
        sampled_variants=[
            ("shared", False),
            ("shared", True),
            ("per_sequence", False),
            ("per_row", False),
            ("per_row", True),
        ],  # fmt: skip
        excluded_counts=(0, 1, 3, 20),  # 20: beyond the ids held in registers, a catalog mask
        float32_precisions=("highest", "high"),  # "medium" multiplies as bfloat16 does
        # (D, k): rows in registers with the least k; row blocks of 32; wide rows in chunks with the most k.
        retrieval_variants=[(50, 10), (256, 100), (1024, 2048)],
    ),
}


# The op families; --ops compiles a subset. "candidates": the tuning sweep's candidate launch
# configurations (benchmarks/tune.py CANDIDATES), 16-bit, at the head/hidden dims of its
# shape classes; not in the ci grid (make offline-compile --ops candidates, or GRID=full).
OPS = ("attention", "sampled", "full", "retrieval", "candidates")


def _dtypes(grid):
    """(dtype, float32 matmul precision or None) pairs: float32 once per precision mode."""
    return [("float32", p) for p in grid["float32_precisions"]] + [("float16", None), ("bfloat16", None)]


def _with_precision(run, precision):
    """run(*args) under torch.set_float32_matmul_precision(precision) (None: as it is)."""

    def wrapped(*args):
        import torch

        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision or previous)
        try:
            run(*args)
        finally:
            torch.set_float32_matmul_precision(previous)

    return wrapped


# ----------------------------------------------------------------------------- worker


def _install_compile_only_driver(cc: int, records: list) -> None:
    """Every JITFunction launch compiles for sm_<cc> and records (kernel name, compiled
    kernel or error) instead of running."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", cc, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        try:
            records.append((self.fn.__name__, grid, launch(self, *args, grid=grid, warmup=True, **kwargs), None))
        except Exception as error:  # noqa: BLE001 (a compile error is a result, not a crash)
            records.append((self.fn.__name__, grid, None, f"{type(error).__name__}: {str(error)[-1200:]}"))

    JITFunction.run = compile_only


def _allow_triton_on_cpu_tensors() -> None:
    """The dispatcher accepts backend="triton" on CPU tensors without the interpreter, so
    the launchers pick their GPU (not their interpreter) block sizes and dtypes."""
    from seqrec_kernels import backends

    unavailable = backends._unavailable_reason
    backends._unavailable_reason = lambda b, device: None if b is backends.Backend.TRITON else unavailable(b, device)


def _attention_cases(grid):
    for dtype, precision in _dtypes(grid):
        for head_dim in grid["attention_dims"]:
            for dropout_p, causal, form in grid["attention_variants"]:
                tag = dict(op="attention", dtype=dtype, precision=precision, D=head_dim, dropout=dropout_p > 0,
                           causal=causal, form=form)  # fmt: skip
                yield tag, (dtype, head_dim, dropout_p, causal, form)


def _run_attention(dtype, head_dim, dropout_p, causal, form):
    import torch

    import seqrec_kernels as sk

    dt = getattr(torch, dtype)
    batch, length, heads = 3, 130, 2
    if form == "padded":  # [B, L, H, D] projections viewed as [B, H, L, D], as SASRec does
        q, k, v = (
            torch.randn(batch, length, heads, head_dim, dtype=dt).transpose(1, 2).requires_grad_() for _ in "qkv"
        )
        lens = torch.tensor([length, 7, 0])
        out = sk.fused_attention(q, k, v, causal=causal, seq_lens=lens, dropout_p=dropout_p, backend="triton")
    else:
        q, k, v = (torch.randn(200, heads, head_dim, dtype=dt, requires_grad=True) for _ in "qkv")
        cu = torch.tensor([0, 130, 193, 200], dtype=torch.int32)
        out = sk.fused_attention_varlen(q, k, v, cu, length, causal=causal, dropout_p=dropout_p, backend="triton")
    out.float().sum().backward()


def _loss_cases(grid):
    for dtype, precision in _dtypes(grid):
        for hidden_dim in grid["loss_dims"]:
            for layout, det in grid["sampled_variants"]:
                tag = dict(op="sampled", dtype=dtype, precision=precision, D=hidden_dim, layout=layout,
                           deterministic=det)  # fmt: skip
                yield tag, ("sampled", dtype, hidden_dim, layout, det)
            for excluded in grid["excluded_counts"]:
                yield (
                    dict(op="full", dtype=dtype, precision=precision, D=hidden_dim, excluded=excluded),
                    ("full", dtype, hidden_dim, excluded),
                )


def _run_loss(kind, dtype, hidden_dim, variant, deterministic=False):
    import torch

    import seqrec_kernels as sk

    dt = getattr(torch, dtype)
    batch, length, num_items, num_neg = 4, 64, 1000, 64
    rows = batch * length
    hidden = torch.randn(rows, hidden_dim, dtype=dt, requires_grad=True)
    weight = torch.randn(num_items, hidden_dim, dtype=dt, requires_grad=True)
    targets = torch.randint(max(GRIDS["full"]["excluded_counts"]), num_items, (rows,))  # never an excluded item
    if kind == "full":
        excluded = tuple(range(variant))
        sk.full_softmax_loss(hidden, weight, targets, exclude_items=excluded, backend="triton").backward()
        return
    neg_shape = {"shared": (num_neg,), "per_sequence": (batch, num_neg), "per_row": (rows, num_neg)}[variant]
    neg_ids = torch.randint(1, num_items, neg_shape)
    if variant == "per_sequence":
        hidden, targets = hidden.view(batch, length, hidden_dim), targets.view(batch, length)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        loss = sk.sampled_softmax_loss(hidden, weight, targets, neg_ids, neg_log_q=torch.randn(neg_shape),
                                       backend="triton")  # fmt: skip
        loss.backward()
    finally:
        torch.use_deterministic_algorithms(previous)


# The kernels each tunable launch configuration applies to (the other kernels a candidate's
# op launches run in their defaults and are compiled by the other families).
TUNED_KERNELS = {
    "attention_fwd": {"_attention_fwd_kernel"},
    "attention_bwd": {"_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_fused_kernel"},
    "full_softmax_fwd": {"_full_fwd_kernel", "_merge_splits_kernel"},
    "full_softmax_bwd": {"_full_bwd_hidden_kernel", "_full_bwd_weight_kernel", "_sum_splits_kernel"},
}


def _default_config(kernel, dim):
    """Today's bfloat16 configuration of a tunable kernel at head (hidden) dim `dim`."""
    import torch

    from seqrec_kernels.triton import attention, softmax_loss

    block_d = max(16, 1 << (dim - 1).bit_length())
    if kernel.startswith("attention"):
        return attention._default_launch_config(block_d, torch.bfloat16, backward=kernel.endswith("bwd"))
    return softmax_loss._default_config(kernel, block_d, dim, torch.bfloat16)


def _candidate_cases(grid):
    """Today's configuration of each tunable kernel (labelled default), then its candidates,
    labelled by their blocks/warps/stages and the options that differ from the default."""
    from benchmarks.tune import CANDIDATES, candidates_for

    for kernel in CANDIDATES:
        family = kernel.rsplit("_", 1)[0]  # attention, full_softmax
        for dim in grid.get("candidate_dims", {}).get(family, ()):
            default = _default_config(kernel, dim)
            block_d = max(16, 1 << (dim - 1).bit_length())
            configs = [default] + [c for c in candidates_for(kernel, block_d) if c != default]
            variants = grid["candidate_attention_variants"] if family == "attention" else [None]
            for config in configs:
                options = [f"{k}={v}" for k, v in list(config.items())[4:] if default.get(k) != v]
                label = "/".join(str(v) for v in list(config.values())[:4]) + "".join(f" {o}" for o in options)
                for variant in variants:
                    call = "" if variant is None else f" (p={variant[0]}, {variant[2]})"
                    tag = dict(op="candidates", dtype="bfloat16", precision=None, D=dim, tuned=kernel,
                               config=f"{'default' if config is default else 'candidate'} {label}{call}")  # fmt: skip
                    yield tag, (kernel, config, dim, variant)


def _run_candidate(kernel, config, dim, variant):
    """The public op (forward and backward) with `kernel` launched in `config`; attention
    called with variant = (dropout_p, causal, form)."""
    from seqrec_kernels import tuning

    with tuning.forcing(kernel, config):
        if kernel.startswith("attention"):
            _run_attention("bfloat16", dim, *variant)
        else:
            _run_loss("full", "bfloat16", dim, 1)


def _retrieval_cases(grid):
    for dtype, precision in _dtypes(grid):
        for hidden_dim, k in grid["retrieval_variants"]:
            yield dict(op="retrieval", dtype=dtype, precision=precision, D=hidden_dim, k=k), (dtype, hidden_dim, k)


def _run_retrieval(dtype, hidden_dim, k):
    """topk_items (with this k) and target_ranks, each row excluding a history."""
    import torch

    import seqrec_kernels as sk

    dt = getattr(torch, dtype)
    rows, num_items = 300, 5000
    hidden, weight = torch.randn(rows, hidden_dim, dtype=dt), torch.randn(num_items, hidden_dim, dtype=dt)
    exclude = torch.randint(0, num_items, (rows, 50))
    sk.topk_items(hidden, weight, k, exclude=exclude, backend="triton")
    sk.target_ranks(hidden, weight, torch.randint(1, num_items, (rows,)), exclude=exclude, backend="triton")


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def _load_widths(ptx: str) -> collections.Counter:
    """Bits per global load instruction -> count (vector width x element width)."""
    widths = collections.Counter()
    for suffixes in re.findall(r"\bld\.global((?:\.[A-Za-z0-9_:]+)+)", ptx):
        parts = suffixes.split(".")
        lanes = int(next((p[1:] for p in parts if re.fullmatch(r"v[248]", p)), 1))
        bits = int(next((p[1:] for p in parts if re.fullmatch(r"[bufs](8|16|32|64)", p)), 0))
        widths[lanes * bits] += 1
    return widths


def _analyze(kernel) -> dict:
    """Resources and instruction mix of one compiled kernel, from its PTX and `cuobjdump -res-usage`."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True, text=True, check=True)
    registers, stack, local = (
        int(x) for x in re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage.stdout).groups()
    )
    wgmma, mma_sync = _count(r"wgmma\.mma_async", ptx), _count(r"\bmma\.sync", ptx)
    loads = _load_widths(ptx)
    metadata = kernel.metadata
    return dict(
        registers=registers,
        local_bytes=local + stack,  # Triton allocates no local arrays: this is spill space
        shared=metadata.shared,
        num_warps=metadata.num_warps,
        num_stages=metadata.num_stages,
        mma="wgmma" if wgmma else "mma.sync" if mma_sync else "",
        mma_count=wgmma + mma_sync,
        cp_async=_count(r"\bcp\.async\.c[ga]\.", ptx),
        tma=_count(r"\bcp\.async\.bulk\.tensor", ptx),
        loads_128=loads[128],
        loads_64=loads[64],
        loads_narrow=sum(n for bits, n in loads.items() if bits < 64),
        loads_16=loads[16],  # one 16-bit element per load: an operand row read unvectorized
        atomics=_count(r"\b(?:atom|red)\.global", ptx),
        # e.g. red.global.gpu.relaxed.add.f32: an optional scope, then the semantics
        atomic_sem=sorted(
            set(re.findall(r"\b(?:atom|red)\.global\.(?:(?:cta|gpu|sys)\.)?(acq_rel|acquire|release|relaxed)\.", ptx))
        ),
    )


def worker(cc: int, grid_name: str, ops=OPS) -> list[dict]:
    """Compiles a grid's cases of `ops` for sm_<cc>; one row per (case, kernel launch)."""
    os.environ["TRITON_INTERPRET"] = "0"  # kernels must be JITFunctions, not interpreted
    sys.path.insert(0, str(ROOT))
    records: list = []
    _install_compile_only_driver(cc, records)
    import seqrec_kernels.triton as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _allow_triton_on_cpu_tensors()

    grid = GRIDS[grid_name]
    cases = [(tag, _with_precision(_run_attention, tag["precision"]), args) for tag, args in _attention_cases(grid)]
    cases += [(tag, _with_precision(_run_loss, tag["precision"]), args) for tag, args in _loss_cases(grid)]
    cases += [(tag, _with_precision(_run_retrieval, tag["precision"]), args) for tag, args in _retrieval_cases(grid)]
    cases += [(tag, _run_candidate, args) for tag, args in _candidate_cases(grid)]
    cases = [case for case in cases if case[0]["op"] in ops]
    analyzed: dict[str, dict] = {}  # a kernel reached by several cases is analyzed once
    rows = []
    for number, (tag, run, args) in enumerate(cases):
        print(f"sm_{cc}: case {number + 1}/{len(cases)} {tag}", file=sys.stderr, flush=True)
        records.clear()
        try:
            run(*args)
        except Exception as error:  # noqa: BLE001 (a launcher that fails before any compile)
            records.append(("(launcher)", (1, 1, 1), None, f"{type(error).__name__}: {str(error)[-600:]}"))
        for name, grid, kernel, error in records:
            if "tuned" in tag and name not in TUNED_KERNELS[tag["tuned"]] and error is None:
                continue
            row = dict(tag, cc=cc, kernel=name, grid=grid)
            if error is not None:
                row["error"] = error
            else:
                key = kernel.hash
                if key not in analyzed:
                    analyzed[key] = _analyze(kernel)
                row.update(analyzed[key])
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- checks


def is_16bit(row: dict) -> bool:
    return row["dtype"] in ("float16", "bfloat16")


def expects_tensor_cores(row: dict) -> bool:
    """Tile products on tensor cores: 16-bit inputs, float32 ones under the "medium" matmul
    precision (bfloat16 operands) and under "high" (3xTF32, which the kernels use up to D=512)."""
    tensor_core_operands = (
        is_16bit(row) or row.get("precision") == "medium" or (row.get("precision") == "high" and row["D"] <= 512)
    )
    return tensor_core_operands and row["kernel"] in TILE_PRODUCT_KERNELS and row.get("layout") != "per_row"


# Tile-product kernels that stream operand tiles through a loop; retrieval's kernels, which
# interleave their tile products with data-dependent merges, are recorded only (not yet pipelined).
STREAMING_KERNELS = TILE_PRODUCT_KERNELS - {"_topk_kernel", "_ranks_kernel"}


def expects_pipelined_vector_loads(row: dict) -> bool:
    """16-bit tile-product kernels stream their operand tiles with cp.async (or TMA) and
    load no 16-bit element alone, at any hidden size (SASRec's 50 included: the launchers pad
    re-read operands to a multiple of 16 columns). float32 is exempt: under IEEE its tiles
    are unpipelined on purpose (pipelined ones spilled)."""
    return is_16bit(row) and row["kernel"] in STREAMING_KERNELS and row.get("layout") != "per_row"


def violations(row: dict) -> list[str]:
    """What is wrong with one compiled kernel (empty: nothing)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    problems = []
    if not (row["grid"][0] < 2**31 and max(row["grid"][1:]) <= 65_535):
        problems.append(f"grid {row['grid']} exceeds CUDA's limits (x < 2^31, y and z <= 65,535)")
    if row["local_bytes"]:
        problems.append(f"spills: {row['local_bytes']} B of local memory per thread")
    if expects_tensor_cores(row) and not row["mma_count"]:
        problems.append("no tensor-core MMA in a tile-product kernel at 16-bit or TF32")
    if expects_pipelined_vector_loads(row) and not (row["cp_async"] or row["tma"]):
        problems.append("no cp.async/TMA: the streamed tiles are not pipelined")
    if expects_pipelined_vector_loads(row) and row["loads_16"]:
        problems.append(f"{row['loads_16']} scalar 16-bit global loads: operand rows not vectorized")
    if row.get("atomics") and row["atomic_sem"] != ["relaxed"]:
        problems.append(f"atomics not relaxed ({', '.join(row['atomic_sem']) or 'no semantics'}): a fence per add")
    if row["shared"] > SHARED_LIMIT[row["cc"]]:
        problems.append(f"shared memory {row['shared']} B > sm_{row['cc']} opt-in limit {SHARED_LIMIT[row['cc']]} B")
    return problems


def describe(row: dict) -> str:
    keys = [k for k in ("op", "dtype", "precision", "D", "dropout", "causal", "form", "layout", "deterministic",
                        "excluded", "k", "tuned", "config") if k in row]  # fmt: skip
    return f"sm_{row['cc']} {row['kernel']} " + " ".join(f"{k}={row[k]}" for k in keys)


def run_targets(grid_name: str, targets=TARGETS, ops=OPS) -> list[dict]:
    """Compiles every target in its own process (the driver stub is process-wide), in parallel."""

    def one(cc):
        result = subprocess.run(
            [sys.executable, __file__, "--worker", str(cc), "--grid", grid_name, "--ops", ",".join(ops)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"offline compile worker for sm_{cc} failed:\n{result.stderr[-4000:]}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        return [row for rows in pool.map(one, targets) for row in rows]


# ----------------------------------------------------------------------------- report


def markdown(rows: list[dict], grid_name: str) -> str:
    """The resource table: one line per distinct compiled kernel and target, grouped."""
    import triton

    compiled = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    lines = [
        "# Offline GPU compilation of the Triton kernels",
        "",
        f"Triton {triton.__version__}, grid `{grid_name}` (`make offline-compile`, i.e. "
        f"`python tests/offline_compile.py --grid {grid_name} --markdown ...`): {len(rows)} kernel launches of the "
        f"public API compiled for sm_80 and sm_90; {len(failed)} failed to compile, "
        f"{sum(bool(violations(r)) for r in rows)} violate a check.",
        "",
        "Checked: every kernel compiles; no local memory (spills) at any dtype, D and float32 matmul "
        "precision mode (float32 rows are labelled with torch.get_float32_matmul_precision(): "
        "highest = IEEE, high = 3xTF32, medium = bfloat16 operands); tensor-core MMA where tiles are "
        "multiplied at 16-bit, medium and high; shared memory within the per-block opt-in limit "
        "(A100 166,912 B; H100 232,448 B); 16-bit tile-product kernels pipelined (cp.async/TMA) with no "
        "scalar 16-bit loads; relaxed atomics. Recorded, not asserted: load widths. Local = spill bytes per "
        "thread.",
        "",
        "| target | kernel | dtype | D | launches | regs | local B (max) | shared B (max) | warps | stages | MMA "
        "| cp.async | global loads 128/64/<64 bit | atomics (sem) | violations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = collections.defaultdict(list)
    for r in compiled:
        dtype = r["dtype"] + (f" ({r['precision']})" if r.get("precision") else "")
        if "tuned" in r:  # today's default or a tuning candidate: its BLOCK_*/BLOCK_*/warps/stages and options
            dtype += f" {r['config']}"
        groups[(r["cc"], r["kernel"], dtype, r["D"])].append(r)
    for (cc, kernel, dtype, dim), members in sorted(groups.items()):
        mma = sorted({m["mma"] or "-" for m in members})
        sem = sorted(
            {s for m in members for s in m["atomic_sem"]}
            or ({"default"} if any(m["atomics"] for m in members) else set())
        )
        lines.append(
            f"| sm_{cc} | `{kernel}` | {dtype} | {dim} | {len(members)} "
            f"| {min(m['registers'] for m in members)}-{max(m['registers'] for m in members)} "
            f"| {max(m['local_bytes'] for m in members)} | {max(m['shared'] for m in members)} "
            f"| {'/'.join(sorted({str(m['num_warps']) for m in members}))} "
            f"| {'/'.join(sorted({str(m['num_stages']) for m in members}))} | {'/'.join(mma)} "
            f"| {'yes' if any(m['cp_async'] or m['tma'] for m in members) else 'no'} "
            f"| {max(m['loads_128'] for m in members)}/{max(m['loads_64'] for m in members)}/"
            f"{max(m['loads_narrow'] for m in members)} "
            f"| {max(m['atomics'] for m in members)} ({', '.join(sem) or '-'}) "
            f"| {sum(bool(violations(m)) for m in members)} |"
        )
    if failed:
        lines += ["", "## Compile failures", ""]
        lines += [f"- {describe(r)}: {r['error'][:300]}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=int, help="compile for this compute capability only; JSON lines out")
    parser.add_argument("--markdown", type=Path, help="write the resource table here")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full", help="which grid of cases (default: full)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"a comma-separated subset of {OPS} (default: all)")
    args = parser.parse_args(argv)
    ops = tuple(args.ops.split(","))
    if unknown := set(ops) - set(OPS):
        parser.error(f"--ops: unknown {sorted(unknown)}; expected a subset of {OPS}")
    if args.worker is not None:
        for row in worker(args.worker, args.grid, ops):
            print(json.dumps(row))
        return 0
    rows = run_targets(args.grid, ops=ops)
    bad = [(r, problem) for r in rows for problem in violations(r)]
    for row, problem in bad:
        print(f"{describe(row)}: {problem}")
    print(f"{len(rows)} kernel launches compiled for sm_80 and sm_90, {len(bad)} violations")
    if args.markdown:
        args.markdown.write_text(markdown(rows, args.grid))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
