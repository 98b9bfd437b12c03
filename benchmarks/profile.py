"""The GPU check's profile: where the time of one fused_attention forward+backward and of one
SASRec training step goes, per backend, from torch.profiler.

    python -m benchmarks.profile [--device cuda] [--out FILE] [--quick]

For each subject and backend, after warm-up, CALLS calls are profiled; per call it reports
the wall time, the device time (the sum of the kernels' and copies' durations), the device
launches (kernels, copies, fills), the aten ops and the top kernels by device time. Device
time far below wall time means the GPU waits on the host. The text table goes to --out
(benchmarks/results/profile-<gpu>.txt by default), so that sessions without a GPU can work
from it. On a CPU (the dry run of `make test`) the same harness runs on tiny shapes, and
there is no device time.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import seqrec_kernels as sk
from benchmarks import common, sasrec

CALLS = 5


def _device_time_us(event) -> float:
    for name in ("device_time", "cuda_time", "self_device_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profiled(fn, device, calls=CALLS):
    """(wall ms per call, device ms per call, launches per call, aten ops per call, top kernels)."""
    for _ in range(3):
        fn()
    common.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        common.synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1e3 / calls
    events = prof.events()
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    aten_ops = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    by_kernel = collections.Counter()
    for event in on_device:
        by_kernel[event.name] += _device_time_us(event)
    device_ms = sum(by_kernel.values()) / 1e3 / calls
    top = [(name[:90], us / 1e3 / calls) for name, us in by_kernel.most_common(8)]
    return wall_ms, device_ms, len(on_device) / calls, len(aten_ops) / calls, top


def attention_subject(device, quick, backend):
    batch, length, head_dim = (4, 12, 10) if device.type == "cpu" else (128, 50, 50)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(batch, 1, length, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))  # fmt: skip
    seq_lens = torch.randint(1, length + 1, (batch,), device=device)
    dout = torch.randn_like(q)

    def run():
        sk.fused_attention(q, k, v, seq_lens=seq_lens, backend=backend).backward(dout)

    return f"fused_attention fwd+bwd B={batch} H=1 L={length} D={head_dim} {str(dtype)[6:]}", run


def sasrec_subject(device, quick, backend, batching):
    setup = sasrec.Setup("Games-tiny", "games", 10, 0.5, batch=4) if device.type == "cpu" else sasrec.SETUPS[0]
    generator = torch.Generator().manual_seed(0)
    padded, num_items = sasrec.training_batches(setup, device, generator)
    packed = sasrec.packed_batches(padded, setup.max_len, device)
    config = sasrec.model_config(setup, num_items, "bce")
    batches = sasrec.loss_arguments(config, padded, packed, device, generator)[batching]
    model, optimizer = sasrec.build(setup, num_items, "bce", backend, device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    step = sasrec.stepper(model, optimizer, batches, device, dtype)
    counter = iter(range(10**9))

    def run():
        step(next(counter) % len(batches))

    precision = "bf16 autocast" if dtype else "float32"
    return f"SASRec train step {setup.describe(num_items)} bce {batching} {precision}", run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="ours only (no reference step)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    out = args.out or common.RESULTS / f"profile-{common.slug(gpu)}.txt"
    ours = ["triton", "cuda"] if device.type == "cuda" else ["triton", "cpp"]
    ours = [b for b in ours if b in {x.value for x in sk.available(device)}]
    subjects = [attention_subject(device, args.quick, b) + (b,) for b in ours]
    # On a CPU the step runs on the extension's C++ path only: Triton's interpreter takes seconds a step.
    step_backends = [b for b in ours if device.type == "cuda" or b == "cpp"] + ([] if args.quick else ["reference"])
    for batching in ("padded", "packed"):
        for backend in step_backends:
            subjects.append(sasrec_subject(device, args.quick, backend, batching) + (backend,))
    lines = [f"# profile on {gpu}: torch {torch.__version__}, {CALLS} profiled calls each, per call below", ""]
    # aten ops: every aten call the profiler records, those inside other ops included.
    header = f"{'subject':<78} {'backend':<9} {'wall ms':>8} {'device ms':>9} {'launches':>8} {'aten ops':>8}"
    lines.append(header)
    details = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with sk.value_checks(False):
        for title, run, backend in subjects:
            try:
                wall_ms, device_ms, launches, aten_ops, top = profiled(run, device)
            except KeyboardInterrupt:  # the GPU check's time limit: keep what was measured
                lines.append("(stopped at the time limit)")
                break
            except Exception as error:  # noqa: BLE001 - a subject that fails is reported, the others still run
                lines.append(f"{title:<78} {backend:<9} error: {type(error).__name__}: {str(error)[:100]}")
                continue
            lines.append(f"{title:<78} {backend:<9} {wall_ms:8.3f} {device_ms:9.3f} {launches:8.1f} {aten_ops:8.1f}")
            if top:
                details.append(f"\n{title}, {backend}: top kernels by device time (ms per call)")
                details += [f"  {ms:8.4f}  {name}" for name, ms in top]
            print(lines[-1], flush=True)
            out.write_text("\n".join(lines + details) + "\n")  # after every subject: a time-out loses nothing
    out.write_text("\n".join(lines + details) + "\n")
    print(f"profile written: {out}")


if __name__ == "__main__":
    main()
