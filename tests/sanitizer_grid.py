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

from attention_helpers import assert_flash_rule
from seqrec_kernels import full_softmax_loss, fused_attention, fused_attention_varlen, sampled_softmax_loss

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"


def outputs_and_grads(op, inputs, backend):
    """op(*inputs, backend=...) and the gradients of a fixed function of it w.r.t. inputs."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(0)  # the same dropout seed for every backend
    out = op(*inputs, backend=backend)
    out.double().square().sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in inputs]


def check(name, op, inputs, floor_scale=1.0):
    """The cuda backend vs float64 truth on one case, by the tests' FlashAttention rule
    (attention_helpers.assert_flash_rule): error at most 2x (gradients 3x) the reference's
    own error in the input dtype, plus a floor of a few units in the last place: 4x the
    tests' floor, since the baseline here, the reference backend, accumulates in float32
    and so errs less than the tests' naive same-dtype baseline."""
    native = "cuda" if DEVICE == "cuda" else "cpp"  # the extension on this device
    ours, same_dtype = (outputs_and_grads(op, inputs, backend) for backend in (native, "reference"))
    truth = outputs_and_grads(op, [t.double() for t in inputs], "reference")
    for i, (a, b, exact) in enumerate(zip(ours, same_dtype, truth)):
        factor, scale = (2, 1.0) if i == 0 else (3, floor_scale)
        assert_flash_rule(f"{name}: output {i}", a, exact, b, inputs[0].dtype, factor, 4 * scale)


def attention_grid():
    seq_lens = torch.tensor([77, 30, 0], device=DEVICE)
    cu_seqlens = torch.tensor([0, 5, 5, 60, 101], device=DEVICE, dtype=torch.int32)
    for dtype, head_dim, causal, dropout_p in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16), (1, 50, 64, 128, 256), (True, False), (0.0, 0.3)
    ):
        name = f"attention {dtype} D={head_dim} causal={causal} p={dropout_p}"
        options = dict(causal=causal, dropout_p=dropout_p)
        floor_scale = 1.0 / (1.0 - dropout_p)  # dropout scales the gradients, and their rounding, by 1 / (1 - p)
        padded = [torch.randn(3, 2, 77, head_dim, device=DEVICE, dtype=dtype) for _ in range(3)]  # [B, H, L, D]
        check(name, functools.partial(fused_attention, seq_lens=seq_lens, **options), padded, floor_scale)
        packed = [torch.randn(101, 2, head_dim, device=DEVICE, dtype=dtype) for _ in range(3)]  # [T, H, D]
        check(f"varlen {name}", functools.partial(varlen, cu_seqlens=cu_seqlens, **options), packed, floor_scale)


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
        sampled = functools.partial(sampled_softmax_loss, pos_ids=pos, neg_ids=neg, reduction="none")
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            check(f"sampled {dtype} D={dim} {layout} deterministic={deterministic}", sampled, inputs)
        torch.use_deterministic_algorithms(False)
        full = functools.partial(full_softmax_loss, targets=pos, reduction="none")
        check(f"full {dtype} D={dim}", full, inputs)


if __name__ == "__main__":
    attention_grid()
    loss_grid()
    print(f"sanitizer grid on {DEVICE}: every cuda-backend op ran and matched the reference")
