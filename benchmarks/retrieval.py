"""Retrieval over the whole catalog: top-k items and target ranks, every provider side by side.

Providers: our `reference` (eager PyTorch in item chunks), `torch` (the [B, N] score matrix:
`hidden @ item_weight.T`, masked, then `torch.topk`, or the count of items above the
target), the same through torch.compile (`compile`), and our `triton` backend (the C++/CUDA
extension has no retrieval kernels). Each row excludes the padding item and a history of 50
items. Grid: B in {1, 256, 4,096}, N in {100k, 1M, 10M}, D in {50, 64, 128}, k in {10, 100};
bf16 on a GPU, float32 on a CPU. Out of memory is a result, not a failure.

    python -m benchmarks.retrieval [--quick] [--csv PATH] [--shapes ...] [--providers ...]
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from benchmarks import common
from seqrec_kernels import target_ranks, topk_items


@dataclasses.dataclass(frozen=True)
class Shape:
    op: str  # topk | ranks
    batch: int  # B
    num_items: int  # N
    hidden: int  # D
    k: int | None = None  # topk only

    def describe(self) -> str:
        top = f" k={self.k}" if self.op == "topk" else ""
        return f"B={self.batch} N={self.num_items} D={self.hidden}{top}"

    @property
    def name(self) -> str:
        return f"{self.op} {self.describe()}"


BATCHES, CATALOGS, HIDDEN, KS = (1, 256, 4096), (100_000, 1_000_000, 10_000_000), (50, 64, 128), (10, 100)
SHAPES = [Shape("topk", b, n, d, k) for b, n, d, k in itertools.product(BATCHES, CATALOGS, HIDDEN, KS)] + [
    Shape("ranks", b, n, d) for b, n, d in itertools.product(BATCHES, CATALOGS, HIDDEN)
]
QUICK_SHAPES = [  # three: make gpu-check gives all quick benchmarks 240 s
    Shape("topk", 256, 1_000_000, 64, 10),
    Shape("topk", 4096, 1_000_000, 64, 100),  # [B, N] scores: 8 GB in bf16
    Shape("ranks", 4096, 1_000_000, 64),
]
CPU_SHAPES = [s for s in SHAPES if s.batch in (1, 256) and s.num_items <= 1_000_000 and s.hidden in (50, 64)]
CPU_QUICK_SHAPES = [Shape("topk", 256, 100_000, 64, 10), Shape("topk", 1, 1_000_000, 50, 100),
                    Shape("ranks", 256, 100_000, 64)]  # fmt: skip
PROVIDERS = ["reference", "torch", "compile", "triton"]
COLUMNS = ["shape", "variant", "dtype", "provider", "status", "ms", "tflops", "gbps", "peak_mib",
           "speedup_vs_reference", "speedup_vs_best_torch", "matmul_fraction", "bandwidth_fraction",
           "max_rel_error"]  # fmt: skip
HISTORY = 50  # items each row excludes, as SASRec's recommend does with a history


def torch_topk(hidden, weight, exclude, k):
    """The [B, N] score matrix our ops avoid, the padding item and each row's exclude at -inf."""
    scores = hidden @ weight.T
    scores[:, 0] = -math.inf
    top = scores.scatter_(1, exclude, -math.inf).topk(k, dim=1)
    return top.values, top.indices


def torch_ranks(hidden, weight, exclude, targets):
    scores = hidden @ weight.T
    target_scores = scores.gather(1, targets[:, None])  # before masking: the target counts even when excluded
    scores[:, 0] = -math.inf
    return (scores.scatter_(1, exclude, -math.inf) > target_scores).sum(1)


_compiled_topk = torch.compile(torch_topk)
_compiled_ranks = torch.compile(torch_ranks)


def providers(names, shape: Shape) -> dict:
    """name -> fn(hidden [B, D], weight [N, D], exclude [B, M], targets [B]) -> outputs."""
    if shape.op == "topk":
        ours = lambda backend: lambda h, w, e, t: topk_items(h, w, shape.k, exclude=e, backend=backend)
        plain = {"torch": lambda h, w, e, t: torch_topk(h, w, e, shape.k),
                 "compile": lambda h, w, e, t: _compiled_topk(h, w, e, shape.k)}  # fmt: skip
    else:
        ours = lambda backend: lambda h, w, e, t: (target_ranks(h, w, t, exclude=e, backend=backend),)
        plain = {"torch": lambda h, w, e, t: (torch_ranks(h, w, e, t),),
                 "compile": lambda h, w, e, t: (_compiled_ranks(h, w, e, t),)}  # fmt: skip
    makers = {"reference": lambda: ours("reference"), "triton": lambda: ours("triton")}
    makers |= {name: (lambda fn=fn: fn) for name, fn in plain.items()}
    return {name: makers[name]() for name in names}


def input_sets(shape: Shape, dtype, count: int, device):
    """count x (hidden, weight, exclude, targets): unit-norm-ish scores of a realistic spread."""
    sets = []
    for _ in range(count):
        hidden = torch.randn(shape.batch, shape.hidden, device=device, dtype=dtype)
        weight = (torch.randn(shape.num_items, shape.hidden, device=device) / math.sqrt(shape.hidden)).to(dtype)
        exclude = torch.randint(1, shape.num_items, (shape.batch, HISTORY), device=device)
        targets = torch.randint(1, shape.num_items, (shape.batch,), device=device)
        sets.append((hidden, weight, exclude, targets))
    return sets


def runner(fn, sets):
    def run(i):
        return tuple(fn(*sets[i]))

    return run


def work(shape: Shape, itemsize: int) -> tuple[int, int]:
    """(flops, bytes): 2*B*N*D for the scores; the item table and hidden rows read once."""
    return 2 * shape.batch * shape.num_items * shape.hidden, (shape.num_items + shape.batch) * shape.hidden * itemsize


def grid(args, device):
    if device.type == "cpu":
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    names = common.selected(args.shapes, [s.name for s in shapes], "--shapes", substrings=True)
    return [s for s in shapes if s.name in names]


def run_config(shape: Shape, dtype, names, skip, env, args, device) -> list[common.Row]:
    flops, moved = work(shape, dtype.itemsize)
    count = common.rotation_count(shape.num_items * shape.hidden * dtype.itemsize, device)
    torch.manual_seed(0)
    sets = input_sets(shape, dtype, count, device)
    runnable = [n for n in names if not (skip and n in common.COMPILED)]
    if "compile" in runnable:
        torch.compiler.reset()  # each configuration compiles for its own static shapes
    fns = providers(runnable, shape)
    truth, rows = None, []
    for name in names:
        if name in fns:
            run = runner(fns[name], sets)
            # Checked: the top-k scores (ids may differ between near-equal scores rounded
            # differently) or the ranks, as floats.
            result = common.measure(
                run, count, device, args.quick, truth, common.TOLERANCE[dtype], is_reference=name == "reference",
                select=lambda t: t.float(), check=lambda run=run: run(0)[:1],
            )  # fmt: skip
        else:
            result = common.Measurement(skip)
        if name == "reference":
            truth = result.outputs
        timed = result.ms is not None
        rows.append(common.new_row(
            env, args.quick, result, benchmark="retrieval", shape=shape.describe(), variant=shape.op,
            dtype=str(dtype).removeprefix("torch."), mode="forward", provider=name,
            tflops=flops / result.ms / 1e9 if timed else None, gbps=moved / result.ms / 1e6 if timed else None,
        ))  # fmt: skip
    common.compare(rows, env, lambda row, group: None)
    return rows


def main(argv=None) -> list[common.Row]:
    shapes_help = '"topk", "ranks", "B=4096", "N=10000000", "topk B=256 N=1000000 D=64 k=10"'
    args = common.parser("retrieval", __doc__, shapes_help, PROVIDERS).parse_args(argv)
    device = common.setup(args)
    names = common.drop_unavailable(common.selected(args.providers, PROVIDERS, "--providers"), device)
    shapes = grid(args, device)
    env = common.environment(device)
    print(f"retrieval on {env.describe()}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for shape in shapes:
        skip = common.skip_compiled(device, args.quick, first_config=not rows)
        config_rows = run_config(shape, dtype, names, skip, env, args, device)
        common.print_config(f"{shape.name}, {dtype}", config_rows)
        rows += config_rows
    note = (
        f"Top-k items (scores and ids) or target ranks over the whole catalog; each row excludes the padding "
        f"item and {HISTORY} history items. `torch` / `compile`: hidden @ item_weight.T, masked, then torch.topk "
        "(or the count above the target), eager / torch.compile. TFLOP/s: 2*B*N*D; GB/s: the item table and the "
        "hidden rows read once; peak_mib: memory one call allocates beyond its inputs (GPU only). Checked: the "
        "top-k scores (ids may differ between near-equal scores) or the ranks, against the reference's."
    )
    common.report("retrieval", rows, env, args.csv, COLUMNS, note)
    return rows


if __name__ == "__main__":
    main()
