"""`python -m seqrec_kernels info | demo`.

info: which backends run on this machine. demo: fused_attention at a SASRec shape on
every available backend, with the max error of the output and the three gradients vs
the float64 reference. Without a GPU, Triton kernels run in Triton's CPU interpreter.
"""

import argparse
import os
import sys

import torch


def _info() -> None:
    from . import __version__, backends

    print(f"seqrec_kernels {__version__}, torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        names = ", ".join(b.value for b in backends.available(device))
        print(f"  {device}: {names}")


def _demo(batch: int, length: int, head_dim: int) -> None:
    from . import backends, fused_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # SASRec: one head, left-padded histories of mixed lengths.
    q, k, v = (torch.randn(batch, 1, length, head_dim, device=device, dtype=torch.float64) for _ in range(3))
    seq_lens = torch.randint(0, length + 1, (batch,), device=device)
    dout = torch.randn_like(q)

    def run(backend, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fused_attention(*inputs, seq_lens=seq_lens, backend=backend)
        out.backward(dout.to(dtype))
        return [out.detach()] + [t.grad for t in inputs]

    truth = run("reference", torch.float64)
    print(f"fused_attention on {device}: B={batch} H=1 L={length} D={head_dim}, left padding, causal")
    print(f"{'backend':<10} {'dtype':<9} {'max |err| out':>14} {'dq':>10} {'dk':>10} {'dv':>10}")
    for backend in backends.available(device):
        for dtype in (torch.float32, torch.bfloat16):
            errors = [(a.double() - b).abs().max().item() for a, b in zip(run(backend.value, dtype), truth)]
            cells = " ".join(f"{e:>10.2e}" for e in errors)
            print(f"{backend.value:<10} {str(dtype)[6:]:<9}     {cells}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqrec_kernels", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which backends run on this machine")
    demo = commands.add_parser("demo", help="fused_attention on every backend vs the float64 reference")
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--length", type=int, default=50)
    demo.add_argument("--head-dim", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if args.command == "info":
        _info()
    else:
        _demo(args.batch, args.length, args.head_dim)


if __name__ == "__main__":
    sys.exit(main())
