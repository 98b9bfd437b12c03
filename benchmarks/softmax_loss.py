"""Sampled and full softmax losses, forward+backward: every provider side by side.

Providers: our `reference` (eager PyTorch: materialized logits), the reference's forward
and backward through torch.compile (`compile`), for the full loss the best a user gets
without us at catalog scale (`chunked-compile`: cross_entropy over chunks of rows whose
logits take at most 2^27 elements, each chunk compiled and checkpointed, so memory stays
bounded), and our `triton` and `cuda` backends.
Grid: T positions in {6,400, 25,600, 65,536}, hidden D in {50, 64, 256}, shared uniform
negatives K in {128, 1,024, 8,192}, catalogs N in {23,715 (Games), 1,000,000}; bf16 on a
GPU. Every position has a target (dense). Out of memory is a result, not a failure.

    python -m benchmarks.softmax_loss [--quick] [--csv PATH] [--shapes ...] [--providers ...]
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.utils.checkpoint

from benchmarks import common
from seqrec_kernels import full_softmax_loss, sampled_softmax_loss
from seqrec_kernels.reference import softmax_loss as reference_loss


@dataclasses.dataclass(frozen=True)
class Shape:
    loss: str  # sampled | full
    tokens: int  # T
    hidden: int  # D
    num_items: int  # N
    num_neg: int | None = None  # K, sampled only

    def describe(self) -> str:
        negatives = f" K={self.num_neg}" if self.loss == "sampled" else ""
        return f"T={self.tokens} D={self.hidden}{negatives} N={self.num_items}"

    @property
    def name(self) -> str:
        return f"{self.loss} {self.describe()}"


TOKENS, HIDDEN, NEGATIVES, CATALOGS = (6400, 25_600, 65_536), (50, 64, 256), (128, 1024, 8192), (23_715, 1_000_000)
SHAPES = [Shape("sampled", t, d, n, k) for t, d, k, n in itertools.product(TOKENS, HIDDEN, NEGATIVES, CATALOGS)] + [
    Shape("full", t, d, n) for t, d, n in itertools.product(TOKENS, HIDDEN, CATALOGS)
]
QUICK_SHAPES = [
    Shape("sampled", 65_536, 64, 1_000_000, 8192),  # the goal's shape
    Shape("sampled", 25_600, 50, 23_715, 1024),  # SASRec on ML-1M lengths with Games' catalog
    Shape("full", 6400, 64, 1_000_000),
    Shape("full", 65_536, 64, 1_000_000),  # beyond the reference's memory
]
CPU_SHAPES = [s for s in SHAPES if s.tokens == 6400 and s.hidden in (50, 64) and s.num_items == 23_715]
CPU_QUICK_SHAPES = [Shape("sampled", 512, 50, 23_715, 128), Shape("full", 128, 50, 23_715)]
PROVIDERS = ["reference", "compile", "chunked-compile", "triton", "cuda", "cpp"]
COLUMNS = ["shape", "variant", "dtype", "provider", "status", "ms", "tflops", "gbps", "peak_mib",
           "speedup_vs_reference", "speedup_vs_best_torch", "matmul_fraction", "bandwidth_fraction",
           "max_rel_error", "goal_met"]  # fmt: skip
IGNORE_INDEX, TEMPERATURE = 0, 1.0

_sampled_forward = torch.compile(reference_loss.sampled_forward)
_sampled_backward = torch.compile(reference_loss.sampled_backward)
_full_forward = torch.compile(reference_loss.full_forward)
_full_backward = torch.compile(reference_loss.full_backward)


class CompiledSampled(torch.autograd.Function):
    """The reference's sampled forward and backward, each through torch.compile (compiling
    sampled_softmax_loss itself would leave the reference op opaque to the compiler)."""

    @staticmethod
    def forward(ctx, hidden, weight, pos_ids, neg_ids):  # [T, D], [N, D], [T], [1, K] shared by all rows
        options = (hidden.shape[0], True, TEMPERATURE, IGNORE_INDEX)  # rows per group, remove hits
        row_loss, lse = _sampled_forward(hidden, weight, pos_ids, neg_ids, None, None, *options)
        ctx.save_for_backward(hidden, weight, pos_ids, neg_ids, lse)
        ctx.options = options
        return row_loss  # [T]

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, pos_ids, neg_ids, lse = ctx.saved_tensors
        grads = _sampled_backward(grad_loss, hidden, weight, pos_ids, neg_ids, None, None, lse, *ctx.options, False)
        return *grads, None, None


class CompiledFull(torch.autograd.Function):
    """The reference's full-catalog forward and backward, each through torch.compile."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, excluded_ids):  # [T, D], [N, D], [T], [E]
        row_loss, lse = _full_forward(hidden, weight, targets, excluded_ids, TEMPERATURE, IGNORE_INDEX)
        ctx.save_for_backward(hidden, weight, targets, excluded_ids, lse)
        return row_loss  # [T]

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, excluded_ids, lse = ctx.saved_tensors
        grads = _full_backward(grad_loss, hidden, weight, targets, excluded_ids, lse, TEMPERATURE, IGNORE_INDEX)
        return *grads, None, None


CHUNK_LOGITS = 2**27  # elements of one chunk's [C, N] logits in chunked-compile (512 MiB in float32)


@torch.compile(dynamic=False)
def _chunk_cross_entropy(hidden, weight, targets):  # [C, D], [C] rows of one chunk; weight [N, D]
    logits = (hidden @ weight.T).float().index_fill(1, targets.new_zeros(1), float("-inf"))  # item 0: no class
    return torch.nn.functional.cross_entropy(logits / TEMPERATURE, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden, weight, targets):
    """The mean full-catalog loss as a user writes it without us: chunks of rows, each chunk's
    logits materialized by a compiled cross_entropy and recomputed in the backward
    (checkpointing), so that memory stays at one chunk's logits."""
    chunk = max(1, CHUNK_LOGITS // weight.shape[0])
    total = sum(
        torch.utils.checkpoint.checkpoint(
            _chunk_cross_entropy, hidden[i : i + chunk], weight, targets[i : i + chunk], use_reentrant=False
        )
        for i in range(0, hidden.shape[0], chunk)
    )
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def mean_loss(row_loss, targets):
    """The "mean" reduction of the public functions: over rows with a target."""
    return row_loss.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


def providers(names, shape: Shape, device) -> dict:
    """name -> fn(hidden [T, D], weight [N, D], pos_ids [T], neg_ids [K]) -> scalar loss."""
    if shape.loss == "sampled":
        ours = lambda backend: lambda h, w, p, n: sampled_softmax_loss(h, w, p, n, backend=backend)
        compiled = lambda h, w, p, n: mean_loss(CompiledSampled.apply(h, w, p, n[None]), p)
    else:
        excluded = torch.tensor([0], dtype=torch.int32, device=device)  # the padding item is never a class
        ours = lambda backend: lambda h, w, p, n: full_softmax_loss(h, w, p, backend=backend)
        compiled = lambda h, w, p, n: mean_loss(CompiledFull.apply(h, w, p, excluded), p)
    makers = {"reference": lambda: ours("reference"), "compile": lambda: compiled}
    if shape.loss == "full":
        makers["chunked-compile"] = lambda: lambda h, w, p, n: chunked_cross_entropy(h, w, p)
    makers |= {backend: (lambda b=backend: ours(b)) for backend in common.OURS}
    return {name: makers[name]() for name in names}


def input_sets(shape: Shape, dtype, count: int, device):
    """count x (hidden, weight, pos_ids, neg_ids): logits of a realistic spread (std ~0.4)."""
    sets = []
    for _ in range(count):
        hidden = torch.randn(shape.tokens, shape.hidden, device=device, dtype=dtype).requires_grad_()
        weight = (torch.randn(shape.num_items, shape.hidden, device=device) * 0.05).to(dtype).requires_grad_()
        pos_ids = torch.randint(1, shape.num_items, (shape.tokens,), device=device)
        neg_ids = torch.randint(1, shape.num_items, (shape.num_neg or 1,), device=device)
        sets.append((hidden, weight, pos_ids, neg_ids))
    return sets


def runner(fn, sets):
    """run(i): loss, d hidden and d weight on input set i."""

    def run(i):
        hidden, weight, pos_ids, neg_ids = sets[i]
        loss = fn(hidden, weight, pos_ids, neg_ids)
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    return run


def work(shape: Shape, itemsize: int) -> tuple[int, int]:
    """(flops, bytes) of one forward+backward. Flops: logits, d hidden and d weight, 2*T*C*D
    each for the C candidates a row scores (K or N). Bytes: hidden and the item rows used
    (negatives and positives, or all N) read by forward and backward, d hidden written, and
    d weight [N, D] written whole."""
    sampled = shape.loss == "sampled"
    scored = shape.num_neg if sampled else shape.num_items
    item_rows = shape.num_neg + shape.tokens if sampled else shape.num_items
    moved = (2 * shape.tokens + 2 * item_rows + shape.tokens + shape.num_items) * shape.hidden * itemsize
    return 6 * shape.tokens * scored * shape.hidden, moved


def goal(row: common.Row, group: dict[str, common.Row]):
    """The issue's goals for bf16 on an H100 (our providers' rows only)."""
    if row.dtype != "bfloat16":
        return None
    if row.variant == "sampled" and row.shape.startswith("T=65536 D=64 K=8192 "):
        reference = group.get("reference")
        vs_reference = common.speedup(row, reference)
        less_memory = None  # how many times less memory than the reference
        if vs_reference is not None and reference.peak_mib and row.peak_mib:
            less_memory = reference.peak_mib / row.peak_mib
        text = f">=5x reference: {_x(vs_reference)}; >=20x less memory: {_x(less_memory)}"
        return text, vs_reference is not None and vs_reference >= 5 and less_memory is not None and less_memory >= 20
    if row.variant == "full" and row.shape.endswith("N=1000000"):
        fraction = row.matmul_fraction
        reference = group.get("reference")
        beyond = " (reference: out of memory)" if reference is not None and reference.status == "out of memory" else ""
        achieved = "n/a" if fraction is None else f"{fraction:.0%}"
        return f">=40% of bf16 matmul rate: {achieved}{beyond}", fraction is not None and fraction >= 0.4
    return None


def _x(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def grid(args, device):
    if device.type == "cpu":
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
    else:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    names = common.selected(args.shapes, [s.name for s in shapes], "--shapes", substrings=True)
    return [s for s in shapes if s.name in names]


def run_config(shape: Shape, dtype, names, skip, env, args, device) -> list[common.Row]:
    flops, moved = work(shape, dtype.itemsize)
    set_bytes = (shape.tokens + shape.num_items) * shape.hidden * dtype.itemsize
    count = common.rotation_count(set_bytes, device)
    torch.manual_seed(0)
    sets = input_sets(shape, dtype, count, device)
    runnable = [n for n in names if not (skip and n in common.COMPILED)]
    runnable = [n for n in runnable if n != "chunked-compile" or shape.loss == "full"]
    if "compile" in runnable:
        torch.compiler.reset()  # each configuration compiles for its own static shapes
    fns = providers(runnable, shape, device)
    truth, rows = None, []
    for name in names:
        if name == "chunked-compile" and shape.loss != "full":
            result = common.Measurement("unsupported: a full-catalog baseline")
        elif name in fns:
            result = common.measure(
                runner(fns[name], sets), count, device, args.quick, truth, common.TOLERANCE[dtype],
                is_reference=name == "reference",
            )  # fmt: skip
        else:
            result = common.Measurement(skip)
        if name == "reference":
            truth = result.outputs
        timed = result.ms is not None
        rows.append(common.new_row(
            env, args.quick, result, benchmark="softmax_loss", shape=shape.describe(), variant=shape.loss,
            dtype=str(dtype).removeprefix("torch."), mode="forward+backward", provider=name,
            real_tokens=shape.tokens, tflops=flops / result.ms / 1e9 if timed else None,
            gbps=moved / result.ms / 1e6 if timed else None,
        ))  # fmt: skip
    common.compare(rows, env, goal)
    return rows


def main(argv=None) -> list[common.Row]:
    shapes_help = '"sampled", "full", "K=8192", "N=1000000", "sampled T=65536 D=64 K=8192 N=1000000"'
    args = common.parser("softmax_loss", __doc__, shapes_help, PROVIDERS).parse_args(argv)
    device = common.setup(args)
    names = common.drop_unavailable(common.selected(args.providers, PROVIDERS, "--providers"), device)
    shapes = grid(args, device)
    env = common.environment(device)
    print(f"softmax_loss on {env.describe()}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16: what training with AMP feeds
    rows = []
    for shape in shapes:
        skip = common.skip_compiled(device, args.quick, first_config=not rows)
        config_rows = run_config(shape, dtype, names, skip, env, args, device)
        common.print_config(f"{shape.name}, {dtype}", config_rows)
        rows += config_rows
    note = (
        "Forward+backward of the mean loss, gradients to hidden and item weights; shared uniform negatives "
        "with accidental hits removed. TFLOP/s: 6*T*K*D (sampled) or 6*T*N*D (full), recomputation not "
        "counted; GB/s: hidden and candidate rows read twice, d hidden and the whole d weight written; "
        "peak_mib: memory one call allocates beyond its inputs (gradients included)."
    )
    common.report("softmax_loss", rows, env, args.csv, COLUMNS, note)
    return rows


if __name__ == "__main__":
    main()
