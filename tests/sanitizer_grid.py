"""A small grid of every `cuda` backend op, forward and backward, for compute-sanitizer
(memcheck, racecheck) on a GPU machine: `make gpu-check` runs it under each tool. Odd
sizes on purpose (tails of every tile); each result is also checked against the float64
truth by the tests' own tolerance rule (attention_helpers.check_against_truth,
loss_helpers.check_loss_against_truth), so a wrong answer shows here too, not only an
invalid access.

    compute-sanitizer --tool memcheck python tests/sanitizer_grid.py [device] [--quick]

The device defaults to cuda; `cpu` runs the same grid on the C++ CPU implementation;
--quick runs a reduced grid. A case that misses the tolerance is printed and counted, not
fatal, so that the whole grid runs under the sanitizer; the exit status is 1 if any missed.
"""

import itertools
import sys
import traceback

import torch

from attention_helpers import check_against_truth
from loss_helpers import check_loss_against_truth, full_pair, sampled_pair


def attention_cases(device, quick):
    dtypes = (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16, torch.float16)
    head_dims = (1, 50) if quick else (1, 50, 64, 128, 256)
    for dtype, head_dim, causal, dropout_p in itertools.product(dtypes, head_dims, (True, False), (0.0, 0.3)):
        name = f"attention {dtype} D={head_dim} causal={causal} p={dropout_p}"

        def padded(dtype=dtype, head_dim=head_dim, causal=causal, dropout_p=dropout_p, backend="cuda"):
            q, k, v = (torch.randn(3, 2, 77, head_dim, device=device, dtype=dtype) for _ in range(3))  # [B, H, L, D]
            seq_lens = torch.tensor([77, 30, 0], device=device)
            check_against_truth(q, k, v, seq_lens, "left", causal, backend, dropout_p=dropout_p)

        def packed(dtype=dtype, head_dim=head_dim, causal=causal, dropout_p=dropout_p, backend="cuda"):
            q, k, v = (torch.randn(4, 2, 55, head_dim, device=device, dtype=dtype) for _ in range(3))
            seq_lens = torch.tensor([5, 0, 55, 41], device=device)  # packed: 101 tokens, then a tail of 4
            check_against_truth(q, k, v, seq_lens, "left", causal, backend, dropout_p=dropout_p, varlen=True, tail=4)

        yield name, padded
        yield f"varlen {name}", packed


def loss_cases(device, quick):
    dtypes = (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16)
    dims = (50,) if quick else (50, 64, 256)
    for dtype, dim, layout in itertools.product(dtypes, dims, ("shared", "row")):

        def inputs(dtype=dtype, dim=dim, layout=layout):
            hidden = torch.randn(3, 37, dim, device=device).to(dtype)
            weight = (torch.randn(1001, dim, device=device) * 0.3).to(dtype)
            pos = torch.randint(0, 1001, (3, 37), device=device)  # some 0: ignored rows
            neg = torch.randint(1, 1001, (129,) if layout == "shared" else (3, 37, 129), device=device)
            return hidden, weight, pos, neg

        for deterministic in (False, True):

            def sampled(deterministic=deterministic, inputs=inputs, backend="cuda"):
                hidden, weight, pos, neg = inputs()
                previous = torch.are_deterministic_algorithms_enabled()
                torch.use_deterministic_algorithms(deterministic)
                try:
                    check_loss_against_truth(*sampled_pair(backend, pos, neg), hidden, weight)
                finally:
                    torch.use_deterministic_algorithms(previous)

            yield f"sampled {dtype} D={dim} {layout} deterministic={deterministic}", sampled

        def full(inputs=inputs, backend="cuda"):
            hidden, weight, pos, _ = inputs()
            check_loss_against_truth(*full_pair(backend, pos.reshape(-1)), hidden.reshape(-1, hidden.shape[-1]), weight)

        if layout == "shared":
            yield f"full {dtype} D={dim}", full


def run_grid(device: str, quick: bool = False) -> int:
    """Runs every case on the extension for `device`; prints each miss; returns how many missed."""
    backend = "cuda" if device == "cuda" else "cpp"
    cases = [*attention_cases(device, quick), *loss_cases(device, quick)]
    missed = 0
    for name, case in cases:
        torch.manual_seed(0)
        try:
            case(backend=backend)
        except AssertionError:
            missed += 1
            print(f"MISS {name}: {traceback.format_exc(limit=0).strip()}", flush=True)
    print(f"sanitizer grid on {device}: {len(cases)} cases ran, {missed} missed the tolerance", flush=True)
    return missed


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(1 if run_grid(next((a for a in args if not a.startswith("--")), "cuda"), "--quick" in args) else 0)
