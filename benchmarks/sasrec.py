"""SASRec end to end: training steps per second and peak memory, per backend and loss.

One step is what the trainer does: forward, loss, backward and an Adam update, on real
left-padded training batches (users drawn from the Games or ML-1M data, or uniform
lengths in [L/4, L] when the data is missing), at the paper's configurations (2 blocks,
hidden 50, 1 head, batch 128; max length 50 for Games, 200 for ML-1M), and with ML-1M's
histories spread over a 1,000,000-item catalog. Losses: bce, gbce (256 negatives per
position), sampled_softmax (256 shared negatives), full_softmax; fp32 and bf16 autocast.
Providers are the backends the whole model runs on: `reference`, `triton`, `cuda`.

    python -m benchmarks.sasrec [--quick] [--csv PATH] [--shapes ...] [--providers ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import torch

from benchmarks import common
from seqrec_kernels.data.dataset import LeaveOneOutSplit
from seqrec_kernels.models.sasrec import LOSSES, SASRec, SASRecConfig


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    dataset: str  # histories from this dataset (common.DATASETS)
    max_len: int
    dropout: float  # the paper's: 0.5 on Games, 0.2 on ML-1M
    num_items: int | None = None  # None: the dataset's catalog; else its ids spread over this many items
    batch: int = 128

    def describe(self, num_items: int) -> str:
        return f"{self.name} B={self.batch} L={self.max_len} d=50 N={num_items}"


SETUPS = [
    Setup("Games", "games", 50, 0.5),
    Setup("ML-1M", "ml-1m", 200, 0.2),
    Setup("ML-1M-1M-items", "ml-1m", 200, 0.2, num_items=1_000_000),
]
CPU_QUICK_SETUPS = [Setup("Games-small", "games", 50, 0.5, batch=16)]
PRECISIONS = {"float32": None, "bf16-autocast": torch.bfloat16}
PROVIDERS = ["reference", "triton", "cuda"]
# Relative error of the loss and whole gradient vs the reference's: under bf16 autocast the
# roundings of every layer compound (a few percent between correct backends).
TOLERANCE = {"float32": 1e-3, "bf16-autocast": 0.1}
NUM_BATCHES = 8  # distinct batches cycled through, so lengths vary from step to step
COLUMNS = ["shape", "variant", "dtype", "provider", "status", "ms", "steps_per_s", "peak_mib",
           "speedup_vs_reference", "max_rel_error", "goal_met"]  # fmt: skip


def grid(args, device):
    """(setups, losses, precisions) this run covers."""
    if device.type == "cpu":
        setups = CPU_QUICK_SETUPS if args.quick else SETUPS[:2]
        losses, precisions = (["bce", "sampled_softmax"] if args.quick else list(LOSSES)), ["float32"]
    elif args.quick:
        setups, losses, precisions = SETUPS, ["bce", "sampled_softmax", "full_softmax"], ["bf16-autocast"]
    else:
        setups, losses, precisions = SETUPS, list(LOSSES), list(PRECISIONS)
    names = common.selected(args.shapes, [s.name for s in setups], "--shapes", substrings=True)
    return [s for s in setups if s.name in names], losses, precisions


def training_batches(setup: Setup, device, generator) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """NUM_BATCHES x (inputs, targets) [B, L] on the device, and the catalog size."""
    data = common.dataset_or_none(common.DATASETS[setup.dataset][0])
    num_items = setup.num_items or (data.num_items if data else common.DATASETS[setup.dataset][1])
    batches = []
    if data is None:  # uniform lengths in [L/4, L], uniform items
        for _ in range(NUM_BATCHES):
            lengths, _ = common.sample_lengths(None, setup.batch, setup.max_len + 1, generator)
            window = torch.randint(1, num_items + 1, (setup.batch, setup.max_len + 1), generator=generator)
            window[torch.arange(setup.max_len + 1) < setup.max_len + 1 - lengths[:, None]] = 0  # left padding
            batches.append((window[:, :-1], torch.where(window[:, :-1] != 0, window[:, 1:], 0)))
    else:
        split = LeaveOneOutSplit.of(data)
        users = split.training_users()
        for _ in range(NUM_BATCHES):
            picks = users[torch.randint(len(users), (setup.batch,), generator=generator)]
            batches.append(split.training_batch(picks, setup.max_len))
        if setup.num_items:  # the same histories over a larger catalog: a fixed random id mapping
            mapping = torch.cat(
                [torch.zeros(1, dtype=torch.long), torch.randperm(num_items, generator=generator)[: data.num_items] + 1]
            )
            batches = [(mapping[inputs], mapping[targets]) for inputs, targets in batches]
    return [(inputs.to(device), targets.to(device)) for inputs, targets in batches], num_items


def build(setup: Setup, num_items: int, loss: str, backend: str, device):
    """The model (same initial weights for every backend) and its optimizer, as the trainer's."""
    torch.manual_seed(0)
    config = SASRecConfig(num_items=num_items, max_len=setup.max_len, dropout=setup.dropout, loss=loss)
    model = SASRec(config).to(device).set_backend(backend)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def checker(model, batch, device, dtype):
    """check(): the loss and the whole gradient (all parameters, flattened: some, like the
    key bias's, are zero up to rounding) on one batch, without dropout and with seeded
    negatives, so that every backend computes the same function."""

    def check():
        model.eval()
        torch.manual_seed(1)
        with autocast(device, dtype):
            loss = model.loss(*batch)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        model.train()
        return loss, torch.cat([g.flatten() for g in grads])

    return check


def stepper(model, optimizer, batches, device, dtype):
    """run(i): one training step on batch i."""

    def run(i):
        with autocast(device, dtype):
            loss = model.loss(*batches[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return (loss,)

    return run


def goal(row: common.Row, group: dict[str, common.Row]):
    """The issue's goal: SASRec on ML-1M >= 3x the reference's steps/s (bf16, on an H100)."""
    if not row.shape.startswith("ML-1M B=") or row.dtype != "bf16-autocast":
        return None
    vs_reference = common.speedup(row, group.get("reference"))
    achieved = "n/a" if vs_reference is None else f"{vs_reference:.2f}x"
    return f">=3x reference steps/s: {achieved}", vs_reference is not None and vs_reference >= 3


def main(argv=None) -> list[common.Row]:
    args = common.parser("sasrec", __doc__, ", ".join(s.name for s in SETUPS + CPU_QUICK_SETUPS), PROVIDERS).parse_args(
        argv
    )
    device = common.setup(args)
    names = common.drop_unavailable(common.selected(args.providers, PROVIDERS, "--providers"), device)
    setups, losses, precisions = grid(args, device)
    env = common.environment(device)
    print(f"sasrec on {env.describe()}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for setup in setups:
        batches, num_items = training_batches(setup, device, generator)
        real_tokens = int(sum(int((inputs != 0).sum()) for inputs, _ in batches) / len(batches))
        for loss, precision in itertools.product(losses, precisions):
            dtype = PRECISIONS[precision]
            truth, config_rows = None, []
            for name in names:
                model, optimizer = build(setup, num_items, loss, name, device)
                result = common.measure(
                    stepper(model, optimizer, batches, device, dtype), len(batches), device, args.quick, truth,
                    TOLERANCE[precision], is_reference=name == "reference",
                    check=checker(model, batches[0], device, dtype),
                )  # fmt: skip
                del model, optimizer
                if name == "reference":
                    truth = result.outputs
                config_rows.append(common.new_row(
                    env, args.quick, result, benchmark="sasrec", shape=setup.describe(num_items), variant=loss,
                    dtype=precision, mode="train step", provider=name, real_tokens=real_tokens,
                    steps_per_s=1e3 / result.ms if result.ms else None,
                ))  # fmt: skip
            common.compare(config_rows, env, goal)
            common.print_config(f"{setup.describe(num_items)}, {loss}, {precision}", config_rows)
            rows += config_rows
    note = (
        "Training steps of SASRec (2 blocks, d=50, 1 head): forward, loss, backward, Adam. ms: median step; "
        "peak_mib: memory a step allocates beyond the model, optimizer state and batches; real_tokens: "
        "non-padding positions per batch."
    )
    common.report("sasrec", rows, env, args.csv, COLUMNS, note)
    return rows


if __name__ == "__main__":
    main()
