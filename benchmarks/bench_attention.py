"""fused_attention at SASRec shapes: every provider side by side, forward and forward+backward.

Providers: our reference (eager PyTorch) and Triton backends, and PyTorch's
scaled_dot_product_attention with the equivalent boolean mask under each SDPA backend
that accepts it. Lengths are drawn from real datasets (left padding, causal). Rows are
appended to benchmarks/results/attention.csv and a table is written per GPU.

    python benchmarks/bench_attention.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from common import (
    RESULTS,
    Environment,
    append_rows,
    bench,
    rotation_count,
    sample_lengths,
    slug,
    timestamp,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqrec_kernels import fused_attention

# (dataset, max length): the SASRec paper's Amazon (50) and MovieLens (200) settings.
SHAPES = [("games.txt", 50), ("ml-1m-train-sequences.txt", 200)]
BATCH, HEADS, HEAD_DIM = 128, 1, 50
DTYPES = [torch.bfloat16, torch.float32]
SDPA_BACKENDS = {
    "sdpa-math": SDPBackend.MATH,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
}


def sdpa_mask(seq_lens, length):
    """[B, 1, L, L] bool: the same visibility as fused_attention (left padding, causal).
    Padding rows see themselves so that SDPA has no fully masked row (their output is unused)."""
    index = torch.arange(length, device=seq_lens.device)
    real = index[None, :] >= length - seq_lens[:, None]  # [B, L]
    mask = real[:, :, None] & real[:, None, :] & (index[None, :] <= index[:, None])
    return (mask | torch.eye(length, dtype=torch.bool, device=seq_lens.device))[:, None]


def providers():
    def ours(backend):
        return lambda q, k, v, seq_lens, mask: fused_attention(q, k, v, seq_lens=seq_lens, backend=backend)

    def sdpa(backend):
        def run(q, k, v, seq_lens, mask):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        return run

    yield "reference", ours("reference")
    yield "triton", ours("triton")
    for name, backend in SDPA_BACKENDS.items():
        yield name, sdpa(backend)


def make_input_sets(seq_lens, length, dtype, count):
    sets = []
    for _ in range(count):
        q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(3))
        sets.append(([t.requires_grad_() for t in (q, k, v)], torch.randn_like(q)))
    return sets


def measure(fn, input_sets, seq_lens, mask, quick):
    """(forward ms, forward+backward ms, peak extra MiB of one forward+backward)."""
    cycle = itertools.cycle(input_sets)

    def forward():
        (q, k, v), _ = next(cycle)
        return fn(q, k, v, seq_lens, mask)

    def forward_backward():
        (q, k, v), dout = next(cycle)
        torch.autograd.grad(fn(q, k, v, seq_lens, mask), (q, k, v), dout)

    forward_backward()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward()
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return bench(forward, quick), bench(forward_backward, quick), peak_mib


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timing runs (make gpu-check)")
    args = parser.parse_args()
    env = Environment.measure()
    print(f"{env.gpu}: copy {env.copy_gbps:.0f} GB/s, bf16 matmul {env.matmul_tflops:.0f} TFLOP/s (measured)")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for (dataset, length), dtype in itertools.product(SHAPES, DTYPES):
        seq_lens = sample_lengths(dataset, BATCH, length, generator).cuda()
        mask = sdpa_mask(seq_lens, length)
        bytes_per_set = 4 * BATCH * HEADS * length * HEAD_DIM * dtype.itemsize
        input_sets = make_input_sets(seq_lens, length, dtype, rotation_count(bytes_per_set))
        real_tokens = int(seq_lens.sum())
        causal_pairs = int((seq_lens * (seq_lens + 1) // 2).sum())
        flops_forward = 4 * causal_pairs * HEAD_DIM * HEADS  # QK^T and PV over visible pairs
        config_rows = []
        for provider, fn in providers():
            try:
                fwd_ms, fwd_bwd_ms, peak_mib = measure(fn, input_sets, seq_lens, mask, args.quick)
            except RuntimeError as error:  # an SDPA backend that rejects this mask/dtype/head dim
                print(f"  {provider}: unsupported ({str(error).splitlines()[0][:100]})")
                continue
            for mode, ms, flops, traffic in (
                ("forward", fwd_ms, flops_forward, 4),  # read q, k, v; write out
                ("forward+backward", fwd_bwd_ms, 3.5 * flops_forward, 12),  # + read out, dout; write dq, dk, dv
            ):
                config_rows.append(dict(
                    gpu=env.gpu, torch=env.torch, triton=env.triton, commit=env.commit, time=timestamp(),
                    dataset=dataset, batch=BATCH, heads=HEADS, max_len=length, head_dim=HEAD_DIM,
                    real_tokens=real_tokens, dtype=str(dtype).removeprefix("torch."), provider=provider, mode=mode,
                    ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2),
                    gbps=round(traffic * real_tokens * HEADS * HEAD_DIM * dtype.itemsize / ms / 1e6, 1),
                    peak_mib=round(peak_mib, 1), copy_gbps=round(env.copy_gbps), matmul_tflops=round(env.matmul_tflops),
                ))  # fmt: skip
        for mode in ("forward", "forward+backward"):
            same = [r for r in config_rows if r["mode"] == mode]
            reference = next(r["ms"] for r in same if r["provider"] == "reference")
            best_torch = min((r["ms"] for r in same if r["provider"].startswith("sdpa")), default=float("nan"))
            for r in same:
                r["speedup_vs_reference"] = round(reference / r["ms"], 2)
                r["speedup_vs_best_torch"] = round(best_torch / r["ms"], 2)
        rows += config_rows
    append_rows(RESULTS / "attention.csv", rows)
    table = format_table(rows, env)
    (RESULTS / f"attention-{slug(env.gpu)}.md").write_text(table)
    print(table)


def format_table(rows, env):
    columns = ["dataset", "max_len", "dtype", "mode", "provider", "ms", "tflops", "gbps", "peak_mib",
               "speedup_vs_reference", "speedup_vs_best_torch"]  # fmt: skip
    lines = [
        f"# fused_attention on {env.gpu} (torch {env.torch}, triton {env.triton}, commit {env.commit})",
        "",
        f"B={BATCH}, H={HEADS}, D={HEAD_DIM}, causal, left padding, lengths sampled from the dataset. "
        f"TFLOP/s over real tokens (causal half); measured limits: copy {env.copy_gbps:.0f} GB/s, "
        f"bf16 matmul {env.matmul_tflops:.0f} TFLOP/s.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
