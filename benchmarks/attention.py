"""Causal attention over left-padded histories: every provider side by side.

Providers: our `reference` (eager PyTorch), PyTorch SDPA with the equivalent boolean mask
under each of its backends (`sdpa-math`, `sdpa-efficient`, `sdpa-flash`, `sdpa-cudnn`;
a backend that rejects the mask is reported as unsupported; dense rows use is_causal),
FlexAttention compiled with a prebuilt block mask (`flex`: the mask's cost not counted) and
with its block mask built in every call (`flex-mask-per-call`: what a training loop whose
lengths change every batch pays), the reference's forward and backward through
torch.compile (`compile`), and our `triton` and `cuda` backends.
Each shape runs with realistic lengths (drawn from a dataset's users, or uniform in
[L/4, L] for the long shapes) and fully dense, in bf16 and fp32, forward and
forward+backward. TFLOP/s count real tokens only, the causal half.

    python -m benchmarks.attention [--quick] [--csv PATH] [--shapes ...] [--providers ...]
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import common
from seqrec_kernels import fused_attention
from seqrec_kernels.reference import attention as reference_attention


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    length: int  # max length L
    heads: int
    head_dim: int
    dataset: str | None  # realistic lengths from this dataset's users; None: uniform in [L/4, L]

    def describe(self) -> str:
        return f"{self.name} B={self.batch} L={self.length} H={self.heads} D={self.head_dim}"


SHAPES = [
    Shape("SASRec-Games", 128, 50, 1, 50, "games"),
    Shape("SASRec-ML-1M", 128, 200, 1, 50, "ml-1m"),
    Shape("mid", 512, 200, 2, 64, "ml-1m"),
    Shape("long-1024-d64", 32, 1024, 4, 64, None),
    Shape("long-1024-d128", 32, 1024, 4, 128, None),
    Shape("long-4096-d64", 32, 4096, 4, 64, None),
    Shape("long-4096-d128", 32, 4096, 4, 128, None),
]
# --quick on a GPU: one configuration per goal, bf16 only.
QUICK_CONFIGS = [("SASRec-Games", "realistic"), ("SASRec-ML-1M", "realistic"), ("long-1024-d64", "realistic"),
                 ("long-1024-d64", "dense")]  # fmt: skip
CPU_SHAPES = SHAPES[:2]  # the long shapes are GPU work
CPU_QUICK_SHAPES = [Shape("SASRec-Games-small", 16, 50, 1, 50, "games")]
VARIANTS = ("realistic", "dense")
MODES = ("forward", "forward+backward")
SDPA_BACKENDS = {
    "sdpa-math": SDPBackend.MATH,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
}
PROVIDERS = ["reference", *SDPA_BACKENDS, "flex", "flex-mask-per-call", "compile", "triton", "cuda", "cpp"]
COLUMNS = ["shape", "variant", "dtype", "mode", "provider", "status", "ms", "tflops", "gbps", "peak_mib",
           "speedup_vs_reference", "speedup_vs_best_torch", "best_torch", "matmul_fraction",
           "bandwidth_fraction", "max_rel_error", "goal_met"]  # fmt: skip


@dataclasses.dataclass
class Layout:
    """Which tokens are real, in the forms each provider takes."""

    seq_lens: torch.Tensor | None  # [B] int32 for fused_attention; None when dense
    seq_start: torch.Tensor  # [B] int32: first real row (left padding)
    seq_len: torch.Tensor  # [B] int32
    sdpa_mask: torch.Tensor | None  # [B, 1, L, L] bool; None when dense (is_causal instead)
    real: torch.Tensor  # [B, 1, L, 1] bool

    @staticmethod
    def of(lengths: torch.Tensor | None, batch: int, length: int, device) -> Layout:
        dense = lengths is None
        seq_len = torch.full((batch,), length, dtype=torch.int32) if dense else lengths.to(torch.int32)
        seq_len = seq_len.to(device)
        seq_start = length - seq_len
        index = torch.arange(length, device=device)
        real = index[None, :] >= seq_start[:, None]  # [B, L]
        mask = None
        if not dense:
            mask = real[:, :, None] & real[:, None, :] & (index[None, :] <= index[:, None])  # [B, L, L]
            # Padding rows see themselves so that no SDPA row is fully masked; their output is
            # never compared, and their dout is zero (as in training), so no gradient changes.
            mask = (mask | torch.eye(length, dtype=torch.bool, device=device))[:, None]
        return Layout(None if dense else seq_len, seq_start, seq_len, mask, real[:, None, :, None])


_compiled_forward = torch.compile(reference_attention.attention_forward)
_compiled_backward = torch.compile(reference_attention.attention_backward)


class CompiledReference(torch.autograd.Function):
    """The reference backend's own forward and backward functions, each through torch.compile
    (compiling fused_attention itself would leave its reference op opaque to the compiler)."""

    @staticmethod
    def forward(ctx, q, k, v, layout):  # q, k, v [B, H, L, D]; layout = (seq_start, seq_len, max_seqlen, scale)
        seq_start, seq_len, max_seqlen, scale = layout
        out, lse = _compiled_forward(q, k, v, seq_start, seq_len, max_seqlen, True, scale, 0.0, None)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        seq_start, seq_len, max_seqlen, scale = ctx.layout
        grads = _compiled_backward(dout, q, k, v, out, lse, seq_start, seq_len, max_seqlen, True, scale, 0.0, None)
        return *grads, None


def flex_provider(layout: Layout, shape: Shape, device, mask_per_call: bool = False):
    """FlexAttention (compiled) with a block mask built once, outside the timed calls, or
    (mask_per_call) inside every call, as batches of new lengths need."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    seq_start = layout.seq_start
    if layout.seq_lens is None:
        mask_mod, batch = (lambda b, h, q_idx, kv_idx: kv_idx <= q_idx), None
    else:  # padding queries see no key: flex gives them zeros, as fused_attention does
        mask_mod = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (kv_idx >= seq_start[b])
        batch = shape.batch
    build_mask = lambda: create_block_mask(mask_mod, batch, None, shape.length, shape.length, device=device)
    compiled = torch.compile(flex_attention)
    if mask_per_call:
        return lambda q, k, v: compiled(q, k, v, block_mask=build_mask())
    block_mask = build_mask()
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def providers(names, layout: Layout, shape: Shape, device) -> dict:
    """name -> fn(q, k, v) -> out [B, H, L, D] (None where this torch lacks the provider)."""
    scale = 1.0 / math.sqrt(shape.head_dim)
    compiled_layout = (layout.seq_start, layout.seq_len, shape.length, scale)

    def ours(backend):
        return lambda q, k, v: fused_attention(q, k, v, seq_lens=layout.seq_lens, backend=backend)

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                if layout.sdpa_mask is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.sdpa_mask)

        return run

    makers = {
        "reference": lambda: ours("reference"),
        **{name: (lambda b=backend: sdpa(b)) for name, backend in SDPA_BACKENDS.items()},
        "flex": lambda: flex_provider(layout, shape, device),
        "flex-mask-per-call": lambda: flex_provider(layout, shape, device, mask_per_call=True),
        "compile": lambda: lambda q, k, v: CompiledReference.apply(q, k, v, compiled_layout),
        "triton": lambda: ours("triton"),
        "cuda": lambda: ours("cuda"),
        "cpp": lambda: ours("cpp"),
    }
    return {name: makers[name]() for name in names}


def input_sets(shape: Shape, layout: Layout, dtype, count: int, device):
    """count x (q, k, v, dout): random, requiring grad; dout is zero at padding rows, as the
    gradient a model sends back through positions it masks out."""
    sets = []
    for _ in range(count):
        q, k, v = (
            torch.randn(
                shape.batch, shape.heads, shape.length, shape.head_dim, device=device, dtype=dtype
            ).requires_grad_()
            for _ in range(3)
        )
        sets.append((q, k, v, torch.randn_like(q) * layout.real))
    return sets


def runner(fn, sets, mode):
    """run(i): the outputs of `mode` on input set i (forward: out; +backward: out, dq, dk, dv)."""

    def run(i):
        q, k, v, dout = sets[i]
        out = fn(q, k, v)
        if mode == "forward":
            return (out,)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    return run


def goal(row: common.Row, group: dict[str, common.Row]):
    """The issues' goals for bf16 forward+backward on an H100 (our providers' rows only)."""
    if row.dtype != "bfloat16" or row.mode != "forward+backward":
        return None
    sdpa = [r for name, r in group.items() if name.startswith("sdpa") and r.status in ("ok", "unchecked")]
    fastest_sdpa = min(sdpa, key=lambda r: r.ms, default=None)
    vs_sdpa = common.speedup(row, fastest_sdpa)
    dense = row.variant == "dense"
    if row.shape.startswith("SASRec") and not dense:
        vs_flex = common.speedup(row, group.get("flex"))  # None where flex cannot run: not judged
        met = vs_sdpa is not None and vs_sdpa >= 3 and (vs_flex is None or vs_flex >= 1.5)
        return f">=3x fastest SDPA: {_x(vs_sdpa)}; >=1.5x flex: {_x(vs_flex)}", met
    if row.shape.startswith("long-1024-d64") and dense:
        vs_cudnn = common.speedup(row, group.get("sdpa-cudnn"))
        return f">=1.0x sdpa-cudnn (dense): {_x(vs_cudnn)}", vs_cudnn is not None and vs_cudnn >= 1.0
    if row.shape.startswith("long-1024-d64"):
        per_call, prebuilt = (common.speedup(row, group.get(name)) for name in ("flex-mask-per-call", "flex"))
        met = per_call is not None and per_call >= 1.5 and prebuilt is not None and prebuilt >= 1.0
        return f">=1.5x flex, mask per call: {_x(per_call)}; >=1.0x flex, prebuilt mask: {_x(prebuilt)}", met
    if row.shape.startswith("long-4096-d128"):
        return f">=0.9x fastest SDPA: {_x(vs_sdpa)}", vs_sdpa is not None and vs_sdpa >= 0.9
    return None


def _x(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def grid(args, device):
    """([(shape, variant)], dtypes) this run covers."""
    if device.type == "cpu":
        configs = list(itertools.product(CPU_QUICK_SHAPES if args.quick else CPU_SHAPES, VARIANTS))
        dtypes = [torch.float32]
    elif args.quick:
        by_name = {s.name: s for s in SHAPES}
        configs, dtypes = [(by_name[name], variant) for name, variant in QUICK_CONFIGS], [torch.bfloat16]
    else:
        configs, dtypes = list(itertools.product(SHAPES, VARIANTS)), [torch.bfloat16, torch.float32]
    names = common.selected(args.shapes, list(dict.fromkeys(s.name for s, _ in configs)), "--shapes", substrings=True)
    return [(s, v) for s, v in configs if s.name in names], dtypes


def run_config(shape, layout, source, dtype, names, skip, env, args, device) -> list[common.Row]:
    """Every provider at one shape, length variant and dtype, forward and forward+backward."""
    seq_len = layout.seq_len.long()
    real_tokens = int(seq_len.sum())
    causal_pairs = int((seq_len * (seq_len + 1) // 2).sum())
    flops_forward = 4 * causal_pairs * shape.heads * shape.head_dim  # QK^T and PV over visible pairs
    token_bytes = real_tokens * shape.heads * shape.head_dim * dtype.itemsize
    set_bytes = 4 * shape.batch * shape.heads * shape.length * shape.head_dim * dtype.itemsize  # q, k, v, dout
    count = common.rotation_count(set_bytes, device)
    torch.manual_seed(0)
    sets = input_sets(shape, layout, dtype, count, device)
    runnable = [n for n in names if not (skip and n in common.COMPILED)]
    if any(n in common.COMPILED for n in runnable):
        torch.compiler.reset()  # each configuration compiles for its own static shapes
    fns = providers(runnable, layout, shape, device)
    rows = []
    for mode in MODES:
        truth, mode_rows = None, []
        flops = flops_forward * (1 if mode == "forward" else 3.5)  # the backward is 2.5x the forward
        moved = token_bytes * (4 if mode == "forward" else 12)  # q, k, v, out (+ q, k, v, out, dout, 3 grads)
        for name in names:
            if name not in fns:
                result = common.Measurement(skip)
            elif fns[name] is None:
                result = common.Measurement("unsupported: this torch has no FlexAttention")
            else:
                result = common.measure(
                    runner(fns[name], sets, mode), count, device, args.quick, truth, common.TOLERANCE[dtype],
                    is_reference=name == "reference", select=lambda t: t * layout.real,
                )  # fmt: skip
            if name == "reference":
                truth = result.outputs
            timed = result.ms is not None
            mode_rows.append(common.new_row(
                env, args.quick, result, benchmark="attention", shape=shape.describe(),
                variant="dense" if layout.seq_lens is None else f"{source} lengths",
                dtype=str(dtype).removeprefix("torch."), mode=mode, provider=name, real_tokens=real_tokens,
                tflops=flops / result.ms / 1e9 if timed else None, gbps=moved / result.ms / 1e6 if timed else None,
            ))  # fmt: skip
        common.compare(mode_rows, env, goal)
        rows += mode_rows
    return rows


def main(argv=None) -> list[common.Row]:
    args = common.parser(
        "attention", __doc__, ", ".join(s.name for s in SHAPES + CPU_QUICK_SHAPES), PROVIDERS
    ).parse_args(argv)
    device = common.setup(args)
    names = common.drop_unavailable(common.selected(args.providers, PROVIDERS, "--providers"), device)
    configs, dtypes = grid(args, device)
    env = common.environment(device)
    print(f"attention on {env.describe()}")
    generator = torch.Generator().manual_seed(0)
    lengths, rows = {}, []
    for shape, variant in configs:
        if shape.name not in lengths:  # one draw per shape, shared by its configurations
            lengths[shape.name] = common.sample_lengths(shape.dataset, shape.batch, shape.length, generator)
        seq_lens, source = lengths[shape.name]
        layout = Layout.of(None if variant == "dense" else seq_lens, shape.batch, shape.length, device)
        for dtype in dtypes:
            skip = common.skip_compiled(device, args.quick, first_config=not rows)
            config_rows = run_config(shape, layout, source, dtype, names, skip, env, args, device)
            common.print_config(f"{shape.describe()}, {config_rows[0].variant}, {dtype}", config_rows)
            rows += config_rows
    note = (
        "Causal attention over left-padded histories. TFLOP/s over real tokens with the causal half "
        "(forward 4*pairs*H*D, backward 2.5x that); GB/s: q, k, v, out (forward) plus q, k, v, out, dout "
        "and the three gradients (backward) over real tokens; peak_mib: memory one call allocates beyond "
        "its inputs; fractions of the measured copy bandwidth and bf16 matmul rate."
    )
    common.report("attention", rows, env, args.csv, COLUMNS, note)
    return rows


if __name__ == "__main__":
    main()
