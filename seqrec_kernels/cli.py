"""The `seqrec` command line (also `python -m seqrec_kernels`).

seqrec train [--data PATH] ...     train SASRec (the built-in synthetic data by default)
seqrec eval CHECKPOINT             test metrics of a checkpoint, both protocols
seqrec recommend CHECKPOINT ITEM.. top-k next items after a history
seqrec plot RUN_DIR                learning curves of a run (needs matplotlib)
seqrec info | demo                 available backends | fused_attention vs float64

A user error (a missing or malformed file, a bad option value, data too small) prints one
line `seqrec: error: ...` to stderr and exits with status 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import traceback
import typing
from pathlib import Path

import torch

from . import backends


def _info() -> None:
    from . import __version__, backends

    print(f"seqrec_kernels {__version__}, torch {torch.__version__}")
    if backends.EXTENSION_ERROR is not None:
        print(f"  seqrec_kernels._C: not built: {backends.EXTENSION_ERROR}")
    else:
        kernels = "with CUDA kernels" if backends.extension_has_cuda_kernels() else "C++ CPU part only, no CUDA kernels"
        print(f"  seqrec_kernels._C: built, {kernels}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        names = ", ".join(b.value for b in backends.available(device))
        print(f"  {device}: {names}; auto runs {_auto_choices(torch.device(device))}")


def _auto_choices(device: torch.device) -> str:
    """What `auto` runs each public op on, on `device`: 'cuda for fused_attention, ...; triton for ...'."""
    ops = ("fused_attention", "fused_attention_varlen", "sampled_softmax_loss", "full_softmax_loss", "topk_items",
           "target_ranks")  # fmt: skip
    chosen: dict[str, list[str]] = {}
    for op_name in ops:
        try:
            backend = backends.resolve("auto", device, op_name).value
        except ValueError:
            backend = "nothing (no backend runs it)"
        chosen.setdefault(backend, []).append(op_name)
    if len(chosen) == 1:
        return f"{next(iter(chosen))} for every op"
    return "; ".join(f"{backend} for {', '.join(names)}" for backend, names in chosen.items())


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


# Help for the model's options; the options themselves (names, types, defaults, choices)
# come from SASRecConfig's fields.
_MODEL_HELP = {
    "max_len": "history length (longer histories keep their latest items)",
    "blocks": "transformer blocks",
    "heads": "attention heads (hidden must be a multiple)",
    "norm_first": "pre-LN blocks (default: the paper's post-LN)",
    "num_negatives": "negatives: shared per batch (sampled_softmax) or per position (gbce)",
    "sampler": "sampled_softmax's negatives",
    "gbce_t": "gbce's calibration t (gSASRec)",
}


def _model_options() -> dict[str, tuple[type, tuple | None, object]]:
    """name -> (type, choices or None, default) of every SASRecConfig field but num_items."""
    from .models.sasrec import SASRecConfig

    hints = typing.get_type_hints(SASRecConfig)
    options = {}
    for field in dataclasses.fields(SASRecConfig):
        if field.name == "num_items":
            continue
        kind, choices = hints[field.name], None
        if typing.get_origin(kind) is typing.Literal:
            choices = typing.get_args(kind)
            kind = type(choices[0])
        if kind not in (int, float, bool, str) or field.default is dataclasses.MISSING:
            raise TypeError(f"SASRecConfig.{field.name}: no command-line option for a {kind} without a default")
        options[field.name] = (kind, choices, field.default)
    return options


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .backends import Backend
    from .data.readers import FORMATS
    from .metrics import PROTOCOLS
    from .train import AMP_DTYPES, BATCHINGS, TrainConfig

    defaults = TrainConfig()
    add = parser.add_argument
    add("--data", default=None, help="interactions file (default: the built-in synthetic dataset)")
    add("--format", default=None, choices=FORMATS, help="default: guessed")
    add("--min-count", type=int, default=defaults.min_count, help="k-core filtering (0: none)")
    model = parser.add_argument_group("model (SASRecConfig)")
    for name, (kind, choices, default) in _model_options().items():
        flag, help = "--" + name.replace("_", "-"), _MODEL_HELP.get(name)
        if kind is bool:
            model.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            model.add_argument(flag, dest=name, type=kind, choices=choices, default=default, help=help)
    add("--epochs", type=int, default=defaults.epochs)
    add("--batch-size", type=int, default=defaults.batch_size)
    add("--lr", type=float, default=defaults.lr)
    add("--weight-decay", type=float, default=defaults.weight_decay, help="> 0: AdamW (decoupled weight decay)")
    add("--eval-every", type=int, default=defaults.eval_every, help="epochs between validations")
    add("--patience", type=int, default=defaults.patience, help="validations without improvement before stopping")
    add("--eval-protocol", default=defaults.eval_protocol, choices=PROTOCOLS)
    add("--device", default=defaults.device)
    add(
        "--batching",
        default=defaults.batching,
        choices=BATCHINGS,
        help="packed: each batch holds real tokens only (fast); padded: [batch, max-len] rows as the paper's code",
    )
    add("--token-buckets", type=int, default=defaults.token_buckets,
        help="packed: how many token counts (static shapes, chosen from the data) batches are padded to")  # fmt: skip
    add("--backend", default=defaults.backend, choices=[b.value for b in Backend])
    add("--amp", default=None, choices=[name for name in AMP_DTYPES if name])
    add("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
        help="torch.compile the whole training step (forward, loss, backward, update); BACKEND: torch.compile's "
        "(default inductor)")  # fmt: skip
    add("--cuda-graph", action=argparse.BooleanOptionalAction, default=defaults.cuda_graph,
        help="on CUDA: replay each training step from a CUDA graph (not with fp16 or several processes)")  # fmt: skip
    add("--seed", type=int, default=defaults.seed)
    add("--deterministic", action="store_true", help="deterministic algorithms: bitwise reproducible runs")
    add("--out", default=defaults.out, help="run directory: checkpoints, metrics.jsonl, test_metrics.json")
    add("--resume", action="store_true", help="continue from OUT/last.pt")
    add("--no-progress", dest="progress", action="store_false",
        help="no progress bars (shown only when stderr is a terminal; otherwise one line per epoch)")  # fmt: skip


def train_config(args: argparse.Namespace):
    """The TrainConfig of parsed `seqrec train` arguments."""
    from .models.sasrec import SASRecConfig
    from .train import TrainConfig

    options = vars(args)
    model = SASRecConfig(num_items=0, **{name: options[name] for name in _model_options()})
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return TrainConfig(model=model, **{name: value for name, value in options.items() if name in names})


def _train(args) -> None:
    from .train import train

    train(train_config(args))


def _eval(args) -> None:
    from .data.dataset import LeaveOneOutSplit
    from .metrics import PROTOCOLS, evaluate
    from .train import TrainConfig, format_report, load_checkpoint, load_dataset

    model, state = load_checkpoint(args.checkpoint, args.device)
    config = TrainConfig.from_dict(state["train_config"])
    if args.data:
        config.data = args.data
    data, _ = load_dataset(config)
    if data.num_items > model.config.num_items:
        raise ValueError(
            f"data: {config.data} has {data.num_items} items, the checkpoint's model knows {model.config.num_items}"
        )
    split = LeaveOneOutSplit.of(data)
    report = {p: evaluate(model, split, "test", p, seed=config.seed) for p in PROTOCOLS}
    print(format_report(report, f"test metrics of {args.checkpoint}"))


def _recommend(args) -> None:
    from .train import load_checkpoint

    if args.k < 1:
        raise ValueError(f"k: expected an int >= 1, got {args.k}")
    model, _ = load_checkpoint(args.checkpoint, args.device)
    max_len = model.config.max_len
    history = torch.tensor([0] * max(0, max_len - len(args.items)) + args.items[-max_len:], device=args.device)
    if int(history.max()) > model.config.num_items or int(history.min()) < 0:
        raise ValueError(f"items: expected ids in 1..{model.config.num_items}, got {args.items}")
    ids, scores = model.recommend(history[None], k=args.k, exclude_seen=not args.include_seen)
    for rank, (item, score) in enumerate(zip(ids[0].tolist(), scores[0].tolist()), 1):
        if item < 0:  # fewer than k items the history has not seen
            break
        print(f"{rank:>3}. item {item:<8} score {score:.4f}")


def _plot(args) -> None:
    run = Path(args.run)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"run: no metrics.jsonl in {run} (a run directory is `seqrec train --out`'s)")
    try:
        import matplotlib
    except ImportError as error:
        raise CommandLineError("plot: needs matplotlib (pip install matplotlib)") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    figure, (loss_axis, metric_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([r["epoch"] for r in records], [r["loss"] for r in records])
    loss_axis.set(xlabel="epoch", ylabel="training loss")
    validated = [r for r in records if "valid" in r]
    for name in ("NDCG@10", "HR@10"):
        metric_axis.plot([r["epoch"] for r in validated], [r["valid"][name] for r in validated], label=name)
    metric_axis.set(xlabel="epoch", ylabel="validation")
    metric_axis.legend()
    figure.tight_layout()
    figure.savefig(run / "curves.png", dpi=120)
    print(f"wrote {run / 'curves.png'}")


class CommandLineError(Exception):
    """A user error found by the command line itself (beyond ValueError/OSError)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors, as one line like every other user error
        raise CommandLineError(f"{message} (see {self.prog} --help)")


# What a user can cause: bad option values, files that are missing, malformed or of the
# wrong kind, data too small (DataFormatError, CheckpointError, InsufficientDataError are
# ValueErrors). Anything else is a bug and keeps its traceback.
USER_ERRORS = (CommandLineError, ValueError, OSError)


def main(argv=None) -> int:
    """Runs the command line; on a user error prints `seqrec: error: ...` (the traceback
    too with --debug) and exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        _main(argv)
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        print(f"seqrec: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seqrec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(
        commands.add_parser("train", help="train SASRec", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    )
    evaluation = commands.add_parser("eval", help="test metrics of a checkpoint")
    evaluation.add_argument("checkpoint")
    evaluation.add_argument("--data", default=None, help="default: the data the checkpoint was trained on")
    evaluation.add_argument("--device", default="cpu")
    recommend = commands.add_parser("recommend", help="top-k next items after a history")
    recommend.add_argument("checkpoint")
    recommend.add_argument("items", type=int, nargs="+", help="the history, oldest first")
    recommend.add_argument("-k", type=int, default=10)
    recommend.add_argument("--include-seen", action="store_true")
    recommend.add_argument("--device", default="cpu")
    plot = commands.add_parser("plot", help="learning curves of a run directory")
    plot.add_argument("run")
    commands.add_parser("info", help="which backends run on this machine")
    demo = commands.add_parser("demo", help="fused_attention on every backend vs the float64 reference")
    demo.add_argument("--batch", type=int, default=16)
    demo.add_argument("--length", type=int, default=50)
    demo.add_argument("--head-dim", type=int, default=50)
    for command in commands.choices.values():  # also after the command; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="on an error, show the full traceback")  # fmt: skip
    return parser


def _main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and not torch.cuda.is_available() and not backends.TRITON_INTERPRETED_AT_IMPORT:
        # Triton's interpreter is chosen when our kernels are decorated, at import, which has
        # happened: the demo reruns itself in a fresh interpreter with it on, so that it shows
        # the triton backend on CPU tensors too.
        env = dict(os.environ, TRITON_INTERPRET="1")
        raise SystemExit(subprocess.run([sys.executable, "-m", "seqrec_kernels", *argv], env=env).returncode)
    commands = dict(train=_train, eval=_eval, recommend=_recommend, plot=_plot, info=lambda a: _info(),
                    demo=lambda a: _demo(a.batch, a.length, a.head_dim))  # fmt: skip
    commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
