"""A small grid of every `cuda` backend op, forward and backward, for compute-sanitizer
(memcheck, racecheck) on a GPU machine: `make gpu-check` runs it under each tool. Odd
sizes on purpose (tails of every tile); each result is also compared with the reference,
so a wrong answer fails here too, not only an invalid access.

    compute-sanitizer --tool memcheck python tests/sanitizer_grid.py [device]

The device defaults to cuda; `cpu` runs the same grid on the C++ CPU implementation.
"""

import functools
import itertools
import sys

import torch

from seqrec_kernels import full_softmax_loss, fused_attention, fused_attention_varlen, sampled_softmax_loss

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def outputs_and_grads(op, inputs, backend):
    """op(*inputs, backend=...) and the gradients of a fixed function of it w.r.t. inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(0)  # the same dropout seed for every backend
    out = op(*inputs, backend=backend)
    out.float().square().sum().backward()
    return [out.detach().float()] + [t.grad.float() for t in inputs]


def check(name, op, inputs, tolerance):
    """The cuda backend vs the reference on one case; raises if any output is off by more
    than `tolerance` times its largest magnitude (or is NaN). A coarse check: the tests
    hold the kernels to the FlashAttention rule; this one runs under the sanitizer."""
    native = "cuda" if DEVICE == "cuda" else "cpp"  # the extension on this device
    ours, reference = (outputs_and_grads(op, inputs, backend) for backend in (native, "reference"))
    for i, (a, b) in enumerate(zip(ours, reference)):
        if not a.numel():
            continue
        error, allowed = (a - b).abs().max().item(), tolerance * max(1.0, b.abs().max().item())
        if not error <= allowed:
            raise AssertionError(f"{name}: output {i} off by {error:.3g} (allowed {allowed:.3g})")


def attention_grid():
    seq_lens = torch.tensor([77, 30, 0], device=DEVICE)
    cu_seqlens = torch.tensor([0, 5, 5, 60, 101], device=DEVICE, dtype=torch.int32)
    for dtype, head_dim, causal, dropout_p in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16), (1, 50, 64, 128, 256), (True, False), (0.0, 0.3)
    ):
        name = f"attention {dtype} D={head_dim} causal={causal} p={dropout_p}"
        tolerance = 1e-3 if dtype == torch.float32 else 3e-2
        options = dict(causal=causal, dropout_p=dropout_p)
        padded = [torch.randn(3, 2, 77, head_dim, device=DEVICE, dtype=dtype) for _ in range(3)]  # [B, H, L, D]
        check(name, functools.partial(fused_attention, seq_lens=seq_lens, **options), padded, tolerance)
        packed = [torch.randn(101, 2, head_dim, device=DEVICE, dtype=dtype) for _ in range(3)]  # [T, H, D]
        check(f"varlen {name}", functools.partial(varlen, cu_seqlens=cu_seqlens, **options), packed, tolerance)


def varlen(q, k, v, cu_seqlens, **options):
    return fused_attention_varlen(q, k, v, cu_seqlens, 55, **options)


def loss_grid():
    for dtype, dim, layout in itertools.product((torch.float32, torch.bfloat16), (50, 64, 256), ("shared", "row")):
        inputs = [
            torch.randn(3, 37, dim, device=DEVICE, dtype=dtype),
            torch.randn(1001, dim, device=DEVICE, dtype=dtype) * 0.3,
        ]
        pos = torch.randint(0, 1001, (3, 37), device=DEVICE)  # some 0: ignored rows
        neg = torch.randint(1, 1001, (129,) if layout == "shared" else (3, 37, 129), device=DEVICE)
        tolerance = 1e-3 if dtype == torch.float32 else 3e-2
        sampled = functools.partial(sampled_softmax_loss, pos_ids=pos, neg_ids=neg, reduction="none")
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            check(f"sampled {dtype} D={dim} {layout} deterministic={deterministic}", sampled, inputs, tolerance)
        torch.use_deterministic_algorithms(False)
        full = functools.partial(full_softmax_loss, targets=pos, reduction="none")
        check(f"full {dtype} D={dim}", full, inputs, tolerance)


if __name__ == "__main__":
    attention_grid()
    loss_grid()
    print(f"sanitizer grid on {DEVICE}: every cuda-backend op ran and matched the reference")
