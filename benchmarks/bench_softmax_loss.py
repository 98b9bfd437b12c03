"""Softmax losses at SASRec training scale: every provider side by side, forward+backward.

T = 25,600 positions (128 sequences x 200), D = 64, bf16; shared negatives K in {128,
8192}; catalogs N in {23,715 (Games), 1,000,000}. Providers: our reference and Triton
backends (Triton also under torch.use_deterministic_algorithms), and the plain PyTorch
formulation (materialized logits + F.cross_entropy). Out-of-memory is recorded, not
fatal. Rows go to benchmarks/results/softmax_loss.csv and a table per GPU.

    python benchmarks/bench_softmax_loss.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools

import torch
import torch.nn.functional as F
from common import RESULTS, Environment, append_rows, bench, rotation_count, slug, timestamp

from seqrec_kernels import full_softmax_loss, sampled_softmax_loss

ROWS, HIDDEN, DTYPE = 128 * 200, 64, torch.bfloat16
CATALOGS = [23_715, 1_000_000]
NEGATIVES = [128, 8192]


def torch_sampled(hidden, weight, pos, neg):
    """Gather + matmul + cross_entropy, what a training loop writes by hand."""
    logits = torch.cat([(hidden * weight[pos]).sum(-1, keepdim=True), hidden @ weight[neg].T], dim=1).float()
    logits[:, 1:] = logits[:, 1:].masked_fill(neg[None, :] == pos[:, None], float("-inf"))
    return F.cross_entropy(logits, torch.zeros_like(pos), reduction="none")[pos != 0].mean()


def torch_full(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    logits[:, 0] = float("-inf")  # the padding item is never a class
    return F.cross_entropy(logits, targets, ignore_index=0)


@contextlib.contextmanager
def deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def providers(kind):
    if kind == "sampled":
        yield (
            "reference",
            contextlib.nullcontext,
            lambda h, w, p, n: sampled_softmax_loss(h, w, p, n, backend="reference"),
        )
        yield "triton", contextlib.nullcontext, lambda h, w, p, n: sampled_softmax_loss(h, w, p, n, backend="triton")
        yield (
            "triton-deterministic",
            deterministic,
            lambda h, w, p, n: sampled_softmax_loss(h, w, p, n, backend="triton"),
        )
        yield "torch", contextlib.nullcontext, torch_sampled
    else:
        yield "reference", contextlib.nullcontext, lambda h, w, p, n: full_softmax_loss(h, w, p, backend="reference")
        yield "triton", contextlib.nullcontext, lambda h, w, p, n: full_softmax_loss(h, w, p, backend="triton")
        yield "torch", contextlib.nullcontext, lambda h, w, p, n: torch_full(h, w, p)


def measure(fn, context, input_sets, weight, quick):
    """(forward+backward ms, peak extra MiB), or None when it runs out of memory."""
    cycle = itertools.cycle(input_sets)

    def step():
        hidden, pos, neg = next(cycle)
        fn(hidden, weight, pos, neg).backward()

    try:
        with context():
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
            return bench(step, quick), peak_mib
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        weight.grad = None
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timing runs (make gpu-check)")
    args = parser.parse_args()
    env = Environment.measure()
    rows = []
    for num_items in CATALOGS:
        weight = (torch.randn(num_items, HIDDEN, device="cuda") * 0.05).to(DTYPE).requires_grad_()
        count = rotation_count(ROWS * HIDDEN * DTYPE.itemsize)
        input_sets = [
            (torch.randn(ROWS, HIDDEN, device="cuda", dtype=DTYPE).requires_grad_(),
             torch.randint(1, num_items, (ROWS,), device="cuda"),
             torch.randint(1, num_items, (max(NEGATIVES),), device="cuda"))
            for _ in range(count)
        ]  # fmt: skip
        configs = [("sampled", k) for k in NEGATIVES] + [("full", num_items)]
        for kind, num_neg in configs:
            sets = [(h, p, n[:num_neg]) for h, p, n in input_sets]
            config_rows = []
            for provider, context, fn in providers(kind):
                result = measure(fn, context, sets, weight, args.quick)
                ms, peak = result if result else (float("nan"), float("nan"))
                flops = 6 * ROWS * num_neg * HIDDEN  # logits, d hidden, d weight: 2 flops each
                config_rows.append(dict(
                    gpu=env.gpu, torch=env.torch, triton=env.triton, commit=env.commit, time=timestamp(),
                    loss=kind, rows=ROWS, hidden=HIDDEN, num_items=num_items,
                    num_neg=num_neg if kind == "sampled" else "", dtype=str(DTYPE).removeprefix("torch."),
                    provider=provider, mode="forward+backward", status="ok" if result else "out of memory",
                    ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2), peak_mib=round(peak, 1),
                ))  # fmt: skip
            reference = next(r["ms"] for r in config_rows if r["provider"] == "reference")
            best_torch = next(r["ms"] for r in config_rows if r["provider"] == "torch")
            for r in config_rows:
                r["speedup_vs_reference"] = round(reference / r["ms"], 2)
                r["speedup_vs_best_torch"] = round(best_torch / r["ms"], 2)
            rows += config_rows
    append_rows(RESULTS / "softmax_loss.csv", rows)
    columns = ["loss", "num_items", "num_neg", "provider", "status", "ms", "tflops", "peak_mib",
               "speedup_vs_reference", "speedup_vs_best_torch"]  # fmt: skip
    table = "\n".join(
        [
            f"# softmax losses on {env.gpu} (torch {env.torch}, triton {env.triton}, commit {env.commit})",
            "",
            f"T={ROWS}, D={HIDDEN}, {DTYPE}, shared uniform negatives, forward+backward; "
            f"nan = out of memory. Measured bf16 matmul peak {env.matmul_tflops:.0f} TFLOP/s.",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows),
        ]
    )
    (RESULTS / f"softmax_loss-{slug(env.gpu)}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
