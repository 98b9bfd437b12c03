"""The GPU check's tuning sweep: time candidate launch configurations of each tunable Triton
kernel at the shape classes that matter and write the winners to the GPU's tuning table.

    python -m benchmarks.tune [--device cuda] [--table PATH] [--dry-run]

For each (kernel, shape class) every candidate in CANDIDATES, today's default among them,
runs through the public op with `seqrec_kernels.tuning.forcing` and is timed (median of
device-event timings, benchmarks.common.bench). The fastest candidate whose outputs match
the reference (benchmarks.common.TOLERANCE, relative) is written to the table with its time,
the default's time and the runner-up; a candidate that fails to compile or to match is
reported and never wins. Each entry also lists every candidate's time and error. The
table is rewritten after every shape class, so a time-out loses nothing already measured.
The launchers read it at run time (seqrec_kernels.tuning).

New kernel variants (tile shapes, warps, stages) enter here as candidates: a variant built
without a GPU is chosen only once a GPU has measured it faster than today's default.

--dry-run (CPU, Triton's interpreter): tiny shapes and one to three candidates per kernel; the table
goes to --table (never the committed one), so `make test` exercises the whole harness.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
import triton

import seqrec_kernels as sk
from benchmarks import common
from seqrec_kernels import tuning
from seqrec_kernels.triton import attention as triton_attention
from seqrec_kernels.triton import softmax_loss as triton_loss


def _config(block_a, block_b, num_warps, num_stages, names, **options):
    return dict(zip(names, (block_a, block_b)), num_warps=num_warps, num_stages=num_stages, **options)


ATTENTION = ("BLOCK_M", "BLOCK_N")
LOSS = ("BLOCK_T", "BLOCK_N")
# 16-bit candidates beside today's default (added per shape class from the launcher itself),
# each with the widest padded head (hidden) dim it is tried at: the offline compile
# (tests/offline_compile.py --ops candidates) found these spill-free for sm_80 and sm_90 up
# to that width (wider, 128-row and 64-row tiles spilled 16-560 B per thread, edge-only
# masking at D=128 16-24 B on sm_80; BLOCK_N=128 loss tiles do not compile). Forward: 128-row
# query tiles (Hopper-sized, wgmma on sm_90), deeper pipelines, the causal blocks with the
# most keys scheduled first (HEAVY_FIRST), the mask only on the key tiles that cross the
# diagonal or the sequence's end (MASK_EDGES_ONLY); backward: 64-row dq tiles and narrower key
# tiles; loss: 128-row tiles, a shallower pipeline, the catalog split across 4 or 8 programs per
# row block (ITEM_SPLITS: forward and d hidden, partials merged) and the fused backward (FUSED:
# d hidden from the d weight kernel's logit tiles, by atomics).
CANDIDATES = {
    "attention_fwd": [
        (_config(128, 64, 8, 2, ATTENTION), 128),
        (_config(128, 32, 4, 2, ATTENTION), 64),
        (_config(64, 32, 4, 3, ATTENTION), 128),
        (_config(64, 64, 4, 3, ATTENTION), 128),
        (_config(128, 64, 8, 2, ATTENTION, HEAVY_FIRST=True), 128),
        (_config(64, 64, 4, 2, ATTENTION, HEAVY_FIRST=True), 128),
        (_config(64, 64, 4, 2, ATTENTION, MASK_EDGES_ONLY=True), 64),
        (_config(128, 64, 8, 2, ATTENTION, HEAVY_FIRST=True, MASK_EDGES_ONLY=True), 64),
    ],
    "attention_bwd": [
        (_config(64, 64, 8, 2, ATTENTION), 64),
        (_config(64, 32, 4, 2, ATTENTION), 64),
        (_config(16, 64, 4, 2, ATTENTION), 128),
        # The one-pass backward (ATOMIC_DQ: dq by float32 atomics beside dk/dv, 5 tile products
        # instead of 7; with MASK_EDGES_ONLY the mask only on the query tiles crossing the
        # diagonal or the end) and the two-pass backward with its dq blocks heaviest first.
        # 64-row tiles (with dropout at D=64 on sm_80, 8 B) and edge-only masking in 4 warps spilled (8-280 B).
        (_config(32, 64, 8, 2, ATTENTION, ATOMIC_DQ=True), 128),
        (_config(32, 64, 8, 2, ATTENTION, ATOMIC_DQ=True, MASK_EDGES_ONLY=True), 128),
        (_config(32, 64, 4, 2, ATTENTION, ATOMIC_DQ=True), 64),
        (_config(32, 64, 4, 2, ATTENTION, HEAVY_FIRST=True), 64),
        (_config(32, 64, 8, 2, ATTENTION, HEAVY_FIRST=True), 128),
    ],
    "full_softmax_fwd": [
        (_config(128, 64, 8, 3, LOSS), 64),
        (_config(64, 64, 8, 2, LOSS), 64),
        (_config(64, 64, 8, 3, LOSS, ITEM_SPLITS=4), 64),
        (_config(64, 64, 8, 3, LOSS, ITEM_SPLITS=8), 64),
        (_config(128, 64, 8, 3, LOSS, ITEM_SPLITS=8), 64),
    ],
    "full_softmax_bwd": [
        (_config(128, 64, 8, 3, LOSS), 64),
        (_config(32, 64, 4, 3, LOSS), 64),
        (_config(64, 64, 8, 3, LOSS, ITEM_SPLITS=4), 64),
        (_config(64, 64, 8, 3, LOSS, ITEM_SPLITS=8), 64),
        (_config(64, 64, 8, 3, LOSS, FUSED=True), 64),
        (_config(32, 64, 4, 3, LOSS, FUSED=True), 64),
    ],
    # The CUDA full loss's d weight written by its kernels in the input dtype (no float32 zero
    # fill and cast): a process-wide switch of the extension (CUDA_SWITCHES), timed through the
    # public op on the cuda backend beside today's float32 buffer.
    "cuda_full_softmax_bwd": [(dict(ITEM_GRAD_IN_DTYPE=True), 1024)],
    # The CUDA attention forward with double-buffered K/V tiles (16-bit: tile t + 2 loads while
    # tile t + 1 computes) beside today's single buffers, by the same kind of switch.
    "cuda_attention_fwd": [(dict(KV_STAGES=2), 256)],
}
# Candidates of CUDA kernels: kernel -> (today's default, the extension op that sets the
# switch and returns its previous value); the table records them, the op does not read it.
CUDA_SWITCHES = {
    "cuda_full_softmax_bwd": (dict(ITEM_GRAD_IN_DTYPE=False), "_set_full_loss_item_grad_in_dtype"),
    "cuda_attention_fwd": (dict(KV_STAGES=1), "_set_attention_kv_stages"),
}
DRY_RUN_CANDIDATES = {
    "attention_fwd": [(_config(16, 16, 4, 1, ATTENTION, HEAVY_FIRST=True, MASK_EDGES_ONLY=True), 1024)],
    "attention_bwd": [
        (_config(16, 32, 4, 1, ATTENTION), 1024),
        (_config(16, 16, 4, 1, ATTENTION, ATOMIC_DQ=True, MASK_EDGES_ONLY=True), 1024),
    ],
    "full_softmax_fwd": [(_config(32, 16, 4, 1, LOSS), 1024), (_config(16, 16, 4, 1, LOSS, ITEM_SPLITS=2), 1024)],
    "full_softmax_bwd": [
        (_config(16, 32, 4, 1, LOSS), 1024),
        (_config(16, 16, 4, 1, LOSS, ITEM_SPLITS=2), 1024),
        (_config(16, 16, 4, 1, LOSS, FUSED=True), 1024),
    ],
}


def candidates_for(kernel: str, block_d: int, table=CANDIDATES) -> list[dict]:
    """The candidate configurations of `kernel` meant for a padded head (hidden) dim of block_d."""
    return [config for config, widest in table[kernel] if block_d <= widest]


@dataclasses.dataclass
class AttentionClass:
    name: str
    batch: int
    heads: int
    length: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16


@dataclasses.dataclass
class LossClass:
    name: str
    rows: int
    items: int
    hidden_dim: int
    dtype: torch.dtype = torch.bfloat16


# In the order the lease's time limit should cut them (the tuning phase has about 80 s for
# some 60 candidate compilations): the SASRec shape, issue 26's attention and loss classes,
# then the rest (`python -m benchmarks.tune --shapes NAME` runs one class alone).
GPU_CLASSES = [
    AttentionClass("SASRec-Games", 128, 1, 50, 50),
    AttentionClass("long-1024-d64", 32, 4, 1024, 64),
    LossClass("full-T8192-N131072-d64", 8192, 131072, 64),  # one class per key: D=50 shares d64's kernels
    AttentionClass("SASRec-ML-1M", 128, 1, 200, 50),
    AttentionClass("long-4096-d128", 4, 4, 4096, 128),
]
DRY_RUN_CLASSES = [AttentionClass("tiny", 2, 1, 20, 8, torch.float32), LossClass("tiny", 24, 40, 8, torch.float32)]


def _attention_runs(shape, device, backend="triton"):
    """(forward, backward, outputs) closures over random inputs of `shape`, lengths 1..L."""
    q, k, v = (torch.randn(shape.batch, shape.heads, shape.length, shape.head_dim, device=device, dtype=shape.dtype,
                           requires_grad=True) for _ in range(3))  # fmt: skip
    seq_lens = torch.randint(1, shape.length + 1, (shape.batch,), device=device)
    dout = torch.randn_like(q)

    def forward():
        return sk.fused_attention(q, k, v, seq_lens=seq_lens, backend=backend)

    def backward(out):
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

    def outputs(backend):
        out = sk.fused_attention(q, k, v, seq_lens=seq_lens, backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    return forward, backward, outputs


def _loss_runs(shape, device, backend="triton"):
    hidden = torch.randn(shape.rows, shape.hidden_dim, device=device, dtype=shape.dtype, requires_grad=True)
    weight = (torch.randn(shape.items, shape.hidden_dim, device=device) * 0.3).to(shape.dtype).requires_grad_()
    targets = torch.randint(1, shape.items, (shape.rows,), device=device)

    def forward():
        return sk.full_softmax_loss(hidden, weight, targets, backend=backend)

    def backward(loss):
        return torch.autograd.grad(loss, (hidden, weight), retain_graph=True)

    def outputs(backend):
        loss = sk.full_softmax_loss(hidden, weight, targets, backend=backend)
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    return forward, backward, outputs


def _has_cuda_switches(device):
    return device.type == "cuda" and all(hasattr(torch.ops.seqrec, op) for _, op in CUDA_SWITCHES.values())


@contextlib.contextmanager
def _forcing(kernel, config):
    """Launches of `kernel` in `config` inside the block: tuning.forcing for a Triton kernel,
    the extension's switch for a CUDA one."""
    if kernel not in CUDA_SWITCHES:
        with tuning.forcing(kernel, config):
            yield
        return
    default, op = CUDA_SWITCHES[kernel]
    switch = getattr(torch.ops.seqrec, op)
    previous = switch(*(config[name] for name in default))  # the switch's one option
    try:
        yield
    finally:
        switch(previous)


def tune_class(shape, device, candidates, log):
    """{kernel: (key, entry)} for the forward and backward kernels of one shape class."""
    if isinstance(shape, AttentionClass):
        fwd_kernel, bwd_kernel, dim = "attention_fwd", "attention_bwd", shape.head_dim
        forward, backward, outputs = _attention_runs(shape, device)
        block_d = max(16, triton.next_power_of_2(dim))
        key = tuning.attention_key(shape.dtype, block_d, shape.length)
        defaults = [triton_attention._default_launch_config(block_d, shape.dtype, b) for b in (False, True)]
    else:
        fwd_kernel, bwd_kernel, dim = "full_softmax_fwd", "full_softmax_bwd", shape.hidden_dim
        forward, backward, outputs = _loss_runs(shape, device)
        block_d = max(16, triton.next_power_of_2(dim))
        key = tuning.loss_key(shape.dtype, block_d, shape.items)
        defaults = [triton_loss._default_config(k, block_d, dim, shape.dtype) for k in (fwd_kernel, bwd_kernel)]
    truth = [t.detach().float() for t in outputs("reference")]
    tolerance = common.TOLERANCE[shape.dtype]
    results = {}
    jobs = [(fwd_kernel, defaults[0], "forward", "triton", forward, backward),
            (bwd_kernel, defaults[1], "backward", "triton", forward, backward)]  # fmt: skip
    if isinstance(shape, LossClass) and _has_cuda_switches(device):
        jobs.append(("cuda_full_softmax_bwd", CUDA_SWITCHES["cuda_full_softmax_bwd"][0], "backward", "cuda",
                     *_loss_runs(shape, device, "cuda")[:2]))  # fmt: skip
    if isinstance(shape, AttentionClass) and _has_cuda_switches(device):
        jobs.append(("cuda_attention_fwd", CUDA_SWITCHES["cuda_attention_fwd"][0], "forward", "cuda",
                     *_attention_runs(shape, device, "cuda")[:2]))  # fmt: skip
    for kernel, default, timed, backend, forward, backward in jobs:
        trials, measured = [], []  # (ms, config, error) of the correct ones; every candidate's record
        for config in [default] + [c for c in candidates_for(kernel, block_d, candidates) if c != default]:
            label = "default" if config is default else "candidate"
            try:
                with _forcing(kernel, config):
                    if timed == "forward":
                        ms = common.bench(forward, device, quick=True)
                    else:
                        out = forward()
                        ms = common.bench(lambda out=out, backward=backward: backward(out), device, quick=True)
                    error = common.max_rel_error(outputs(backend), truth)
            except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or run loses
                log(
                    f"  {kernel:<18} {label:<9} {config}  error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                )
                continue
            verdict = "ok" if error <= tolerance else f"MISMATCH (rel err {error:.2e} > {tolerance:.0e})"
            log(f"  {kernel:<18} {label:<9} {config}  {ms:9.4f} ms  rel err {error:.1e}  {verdict}")
            measured.append(
                dict(config=config, ms=round(ms, 5), rel_error=float(f"{error:.3g}"), ok=error <= tolerance)
            )
            if error <= tolerance:
                trials.append((ms, config, error))
        trials.sort(key=lambda t: t[0])
        default_ms = next((ms for ms, config, _ in trials if config is default), None)
        if not trials:
            log(f"  {kernel}: no candidate ran correctly; nothing written")
            continue
        (ms, config, error), runner_up = trials[0], (trials[1] if len(trials) > 1 else (None, None, None))
        results[kernel] = (key, dict(
            config=config, ms=round(ms, 5), default_ms=None if default_ms is None else round(default_ms, 5),
            runner_up=runner_up[1], runner_up_ms=None if runner_up[0] is None else round(runner_up[0], 5),
            shape=shape.name, checked_rel_error=float(f"{error:.3g}"), candidates=measured,
        ))  # fmt: skip
        speedup = f"{default_ms / ms:.2f}x the default" if default_ms else "default failed"
        log(f"  {kernel}: winner {config} at {ms:.4f} ms ({speedup})")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--table", type=Path, default=None,
                        help="the table to write (default: seqrec_kernels/tuning/<gpu>.json)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, a few candidates per kernel")
    parser.add_argument("--shapes", default=None, help="comma-separated parts of shape-class names to run")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("--device: the tuning sweep times kernels on a GPU; on a CPU use --dry-run")
    if args.dry_run and args.table is None:
        raise SystemExit("--table: a dry run writes its table elsewhere than the committed ones")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    table_path = args.table or tuning.TABLE_DIR / f"{tuning.gpu_slug(gpu)}.json"
    classes = DRY_RUN_CLASSES if args.dry_run else GPU_CLASSES
    names = common.selected(args.shapes, [c.name for c in classes], "--shapes", substrings=True)
    candidates = DRY_RUN_CANDIDATES if args.dry_run else CANDIDATES
    table = json.loads(table_path.read_text()) if table_path.exists() else {}

    def log(line):
        print(line, flush=True)

    log(f"# tuning sweep on {gpu}: torch {torch.__version__}, triton {triton.__version__}, table {table_path}")
    started = time.perf_counter()
    with sk.value_checks(False):
        for shape in [c for c in classes if c.name in names]:
            log(f"{shape.name}: {shape}")
            for kernel, (key, entry) in tune_class(shape, device, candidates, log).items():
                table.setdefault(kernel, {})[key] = entry
            table_path.parent.mkdir(parents=True, exist_ok=True)
            partial = table_path.with_suffix(".json.partial")  # written whole, then renamed: never half a table
            partial.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            os.replace(partial, table_path)  # after every class
    tuning.clear_caches()  # the table and the launch plans derived from it
    log(f"# {time.perf_counter() - started:.0f} s; table written: {table_path}")


if __name__ == "__main__":
    main()
