"""SASRec end to end: training steps per second and peak memory, per backend, loss and batching.

One step is what the trainer does: forward, loss, backward and an Adam update, on real
training batches (users drawn from the Games or ML-1M data, or uniform lengths in
[L/4, L] when the data is missing), at the paper's configurations (2 blocks, hidden 50,
1 head, batch 128; max length 50 for Games, 200 for ML-1M), and with ML-1M's histories
spread over a 1,000,000-item catalog. Losses: bce, gbce (256 negatives per position),
sampled_softmax (256 shared negatives), full_softmax; fp32 and bf16 autocast. Providers
are the backends the whole model runs on: `reference`, `triton`, `cuda` (GPU), `cpp` (CPU).

Batchings: every configuration is timed on the same batches twice, `padded` (left-padded
[B, L] rows, as the paper's code) and `packed` (PackedBatch.from_padded: the real tokens
only, T rounded up to a multiple of 128 on CUDA as the trainer does, of 1 on a CPU). The
batching is the second word of the `variant` column ("bce packed"); packed rows carry
`speedup_vs_padded`, their steps/s over those of the same provider, loss, precision and
setup on padded batches. Negatives are drawn on the host before timing, as the trainer
draws them (uniform items; sample_negatives()), and the packed batch takes those of its
real tokens, so both batchings compute the same losses. Each provider is checked against
the reference of the same batching; the packed reference against the padded reference
(the same function: the same weights and negatives, no dropout), so its max_rel_error is
packed vs padded.

The grid: on a GPU, all setups, losses and precisions (--quick: sampled_softmax and
full_softmax in bf16); on a CPU, fp32 on Games and ML-1M with every loss (--quick: a
batch of 16 on Games, bce and sampled_softmax), each in both batchings. Peak memory is
counted on a GPU only.

    python -m benchmarks.sasrec [--quick] [--csv PATH] [--shapes ...] [--providers ...]

`--trainer` times our trainer's step instead (benchmark `sasrec-trainer`): a whole epoch of
Games (bce by default, paper hyperparameters) through the trainer's own batches (packed,
static token counts, built on a background thread) with the step eager, compiled whole
(torch.compile, fullgraph; compilation outside the timed epoch) and replayed from CUDA
graphs (CUDA), beside a plain-PyTorch SASRec (nn.MultiheadAttention on left-padded [B, L]
batches of the same users and negatives, eager, the same loss, our Adam) on the same
device: ms per step, steps/s and epoch seconds. Then the host time per step: the same
steps at a tiny shape (B=4, L=8, d=8), where the device work is negligible.

    python -m benchmarks.sasrec --trainer [--loss bce|full_softmax] [--compile-backend inductor]
        [--providers eager,compiled,graph,plain-pytorch]
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from seqrec_kernels import value_checks
from seqrec_kernels.data.dataset import LeaveOneOutSplit, SequenceDataset
from seqrec_kernels.data.packed import PackedBatch
from seqrec_kernels.data.synthetic import synthetic_interactions
from seqrec_kernels.models.sasrec import LOSSES, SASRec, SASRecConfig, negative_sampler, sample_negatives
from seqrec_kernels.train import (
    TrainConfig,
    TrainingBatches,
    epoch_users,
    prefetched,
    step_loss_function,
    training_backends,
)
from seqrec_kernels.training_step import TrainingStep, make_optimizer


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
PROVIDERS = ["reference", "triton", "cuda", "cpp"]
BATCHINGS = ("padded", "packed")  # padded first: packed rows are compared with the padded ones
# Relative error of the loss and whole gradient vs the reference's: under bf16 autocast the
# roundings of every layer compound (a few percent between correct backends).
TOLERANCE = {"float32": 1e-3, "bf16-autocast": 0.1}
NUM_BATCHES = 8  # distinct batches cycled through, so lengths vary from step to step
COLUMNS = ["shape", "variant", "dtype", "provider", "status", "ms", "steps_per_s", "peak_mib",
           "speedup_vs_reference", "speedup_vs_padded", "max_rel_error", "goal_met"]  # fmt: skip


def grid(args, device):
    """(setups, losses, precisions) this run covers; each in every batching."""
    if device.type == "cpu":
        setups = CPU_QUICK_SETUPS if args.quick else SETUPS[:2]
        losses, precisions = (["bce", "sampled_softmax"] if args.quick else list(LOSSES)), ["float32"]
    elif args.quick:
        # 200 s did not cover bce too within make gpu-check's limit (H200)
        setups, losses, precisions = SETUPS, ["sampled_softmax", "full_softmax"], ["bf16-autocast"]
    else:
        setups, losses, precisions = SETUPS, list(LOSSES), list(PRECISIONS)
    names = common.selected(args.shapes, [s.name for s in setups], "--shapes", substrings=True)
    return [s for s in setups if s.name in names], losses, precisions


def training_batches(setup: Setup, device, generator) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """NUM_BATCHES x left-padded (inputs, targets) [B, L] on the device, and the catalog size."""
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


def packed_batches(batches, max_len: int, device) -> list[PackedBatch]:
    """The padded batches packed as the trainer packs them, on the host (moved to the device
    by loss_arguments): T rounded up to a multiple of 128 on CUDA (fixed shapes), of 1 on a
    CPU (no padding tail)."""
    bucket = 128 if device.type == "cuda" else 1
    return [PackedBatch.from_padded(inputs.cpu(), targets.cpu(), max_len, bucket) for inputs, targets in batches]


def model_config(setup: Setup, num_items: int, loss: str) -> SASRecConfig:
    return SASRecConfig(num_items=num_items, max_len=setup.max_len, dropout=setup.dropout, loss=loss)


def loss_arguments(config: SASRecConfig, padded, packed, device, generator) -> dict[str, list[tuple]]:
    """{batching: [the arguments of model.loss() for each batch]}: (inputs, targets, negatives)
    padded, (PackedBatch, None, negatives) packed. The negatives are drawn on the host, as the
    trainer draws them (uniform items here): [B, L, k] ids and log q per position for bce
    and gbce, of which the packed batch takes those of its real tokens (zeros on its tail,
    which has no target); sampled_softmax's shared [K] are the same for both; None for
    full_softmax. So both batchings compute the same losses, step for step."""
    sampler = negative_sampler(config)
    arguments = {"padded": [], "packed": []}
    for (inputs, targets), batch in zip(padded, packed, strict=True):
        negatives = sample_negatives(config, sampler, tuple(targets.shape), generator=generator)
        packed_negatives = negatives
        if negatives is not None and negatives[0].dim() == 3:  # per position: [B, L, k] -> [T, k]
            real = inputs.cpu() != 0  # the packed order: row by row, oldest first
            packed_negatives = tuple(
                torch.cat([t[real], t.new_zeros(batch.num_tokens - int(real.sum()), t.shape[-1])]) for t in negatives
            )
        on_device = lambda values: None if values is None else tuple(t.to(device) for t in values)
        arguments["padded"].append((inputs, targets, on_device(negatives)))
        arguments["packed"].append((batch.to(device), None, on_device(packed_negatives)))
    return arguments


def build(setup: Setup, num_items: int, loss: str, backend: str, device):
    """The model (same initial weights for every backend and batching) and its optimizer, as the trainer's."""
    torch.manual_seed(0)
    model = SASRec(model_config(setup, num_items, loss)).to(device).set_backend(backend)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98))


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def checker(model, arguments, device, dtype):
    """check(): the loss and the whole gradient (all parameters, flattened: some, like the
    key bias's, are zero up to rounding) of model.loss(*arguments), without dropout and with
    the given negatives, so that every backend and batching computes the same function."""

    def check():
        model.eval()
        with autocast(device, dtype):
            loss = model.loss(*arguments)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        model.train()
        return loss, torch.cat([g.flatten() for g in grads])

    return check


def stepper(model, optimizer, batches, device, dtype):
    """run(i): one training step on batch i (the arguments of model.loss()), without the ops'
    host reads of index values, as the trainer steps (its batches are valid by construction)."""

    def run(i):
        with value_checks(False), autocast(device, dtype):
            loss = model.loss(*batches[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return (loss,)

    return run


def goal(row: common.Row, group: dict[str, common.Row]):
    """The issue's goal: SASRec on ML-1M >= 3x the reference's steps/s (bf16, on an H100),
    judged on padded batches against the padded reference, as it was set. Packed batches
    are not judged: their gain is the `speedup_vs_padded` column, a figure, not a goal."""
    if not row.shape.startswith("ML-1M B=") or row.dtype != "bf16-autocast" or not row.variant.endswith(" padded"):
        return None
    vs_reference = common.speedup(row, group.get("reference"))
    achieved = "n/a" if vs_reference is None else f"{vs_reference:.2f}x"
    return f">=3x reference steps/s: {achieved}", vs_reference is not None and vs_reference >= 3


def fill_speedup_vs_padded(rows: list[common.Row]) -> None:
    """speedup_vs_padded of the packed rows of one configuration: packed steps/s over the
    padded steps/s of the same provider."""
    padded = {r.provider: r for r in rows if r.variant.endswith(" padded")}
    for r in rows:
        if r.variant.endswith(" packed"):
            r.speedup_vs_padded = common.speedup(r, padded.get(r.provider))


def print_config(title: str, rows: list[common.Row]) -> None:
    """One line per batching and provider as soon as a configuration is done."""
    print(title)
    for r in rows:
        batching = r.variant.rsplit(" ", 1)[-1]
        if r.status not in common.TIMED:
            print(f"  {batching:<7} {r.provider:<10} {r.status}")
            continue
        memory = "" if r.peak_mib is None else f"  {r.peak_mib:9.1f} MiB"
        error = "" if r.max_rel_error is None else f"  err {r.max_rel_error:.1e}"
        gain = "" if r.speedup_vs_padded is None else f"  {r.speedup_vs_padded:5.2f}x padded"
        print(f"  {batching:<7} {r.provider:<10} {r.ms:10.3f} ms {r.steps_per_s:9.2f} steps/s{memory}{error}{gain}  "
              f"{r.status}")  # fmt: skip


def main(argv=None) -> list[common.Row]:
    parser = common.parser("sasrec", __doc__, ", ".join(s.name for s in SETUPS + CPU_QUICK_SETUPS), PROVIDERS)
    parser.add_argument("--trainer", action="store_true", help="the trainer's step modes beside a plain-PyTorch SASRec")
    parser.add_argument("--loss", default="bce", choices=PLAIN_LOSSES, help="--trainer: the loss")
    parser.add_argument("--compile-backend", default="inductor", help="--trainer: torch.compile's backend")
    args = parser.parse_args(argv)
    if args.trainer:
        return trainer_main(args)
    device = common.setup(args)
    names = common.drop_unavailable(common.selected(args.providers, PROVIDERS, "--providers"), device)
    setups, losses, precisions = grid(args, device)
    env = common.environment(device)
    print(f"sasrec on {env.describe()}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for setup in setups:
        padded, num_items = training_batches(setup, device, generator)
        packed = packed_batches(padded, setup.max_len, device)
        real_tokens = int(sum(int((inputs != 0).sum()) for inputs, _ in padded) / len(padded))
        for loss, precision in itertools.product(losses, precisions):
            dtype, tolerance = PRECISIONS[precision], TOLERANCE[precision]
            negatives_seed = torch.Generator().manual_seed(1)  # the same negatives whatever ran before
            batchings = loss_arguments(model_config(setup, num_items, loss), padded, packed, device, negatives_seed)
            truth, config_rows = {}, []  # truth: the reference's loss and gradient per batching
            for batching in BATCHINGS:
                batch_rows = []
                for name in names:
                    is_reference = name == "reference"
                    model, optimizer = build(setup, num_items, loss, name, device)
                    result = common.measure(
                        stepper(model, optimizer, batchings[batching], device, dtype), len(batchings[batching]),
                        device, args.quick, truth.get("padded" if is_reference else batching), tolerance,
                        is_reference=is_reference, check=checker(model, batchings[batching][0], device, dtype),
                    )  # fmt: skip
                    del model, optimizer
                    if is_reference:
                        truth[batching] = result.outputs
                        if result.status == "ok" and (result.max_rel_error or 0.0) > tolerance:
                            result.status = "mismatch"  # the packed reference disagrees with the padded one
                    batch_rows.append(common.new_row(
                        env, args.quick, result, benchmark="sasrec", shape=setup.describe(num_items),
                        variant=f"{loss} {batching}", dtype=precision, mode="train step", provider=name,
                        real_tokens=real_tokens, steps_per_s=1e3 / result.ms if result.ms else None,
                    ))  # fmt: skip
                common.compare(batch_rows, env, goal)  # speedup_vs_reference: vs the same batching's
                config_rows += batch_rows
            fill_speedup_vs_padded(config_rows)
            print_config(f"{setup.describe(num_items)}, {loss}, {precision}", config_rows)
            rows += config_rows
    note = (
        "Training steps of SASRec (2 blocks, d=50, 1 head): forward, loss, backward, Adam, on the same batches "
        "padded ([B, L] rows) and packed (the real tokens only; T rounded up to a multiple of 128 on CUDA). "
        "Negatives are drawn before timing, as the trainer draws them on the host. ms: median step; peak_mib: "
        "memory a step allocates beyond the model, optimizer state, batches and negatives (GPU only); "
        "speedup_vs_reference: vs the reference on the same batching; speedup_vs_padded: packed steps/s over "
        "padded steps/s of the same provider; max_rel_error: loss and gradient vs the reference of the same "
        "batching (the packed reference's: vs the padded reference); real_tokens: non-padding positions per batch."
    )
    common.report("sasrec", rows, env, args.csv, COLUMNS, note)
    return rows


# ----------------------------------------------------------------------------- the trainer's steps

PLAIN_LOSSES = ("bce", "full_softmax")
TRAINER_COLUMNS = ["shape", "variant", "mode", "provider", "status", "ms", "steps_per_s", "speedup_vs_best_torch"]


class PlainSASRec(nn.Module):
    """SASRec as a plain-PyTorch port writes it, the baseline: nn.MultiheadAttention over
    left-padded [B, L] rows with a causal mask, padding zeroed after every block (the
    authors' arrangement: normed queries, raw keys and values), the same losses computed
    densely: bce from [B, L, 1] negatives, full_softmax by cross_entropy over [B, L, N + 1]
    logits."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        d, self.config = config.hidden, config
        self.item_embedding = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.dropout = nn.Dropout(config.dropout)
        self.attention_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(config.blocks))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(d, config.heads, dropout=config.dropout, batch_first=True)
            for _ in range(config.blocks)
        )
        self.feed_forward_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(config.blocks))
        self.feed_forwards = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(d, d),
                          nn.Dropout(config.dropout))
            for _ in range(config.blocks)
        )  # fmt: skip
        self.final_norm = nn.LayerNorm(d, eps=1e-8)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, d]
        length = inputs.shape[1]
        real = (inputs != 0)[..., None]  # [B, L, 1]
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).triu(1)  # True: masked
        x = self.item_embedding(inputs) * math.sqrt(self.config.hidden) + self.position_embedding.weight[-length:]
        x = self.dropout(x) * real
        for attention_norm, attention, feed_forward_norm, feed_forward in zip(
            self.attention_norms, self.attentions, self.feed_forward_norms, self.feed_forwards
        ):
            queries = attention_norm(x)
            x = queries + attention(queries, x, x, attn_mask=causal, need_weights=False)[0]
            x = feed_forward_norm(x)
            x = (x + feed_forward(x)) * real
        return self.final_norm(x)

    def loss(self, inputs, targets, neg_ids=None, neg_log_q=None):
        hidden, items = self(inputs), self.item_embedding.weight
        if self.config.loss == "full_softmax":
            logits = hidden @ items.T  # [B, L, N + 1]
            logits[..., 0] = -math.inf  # the padding item is never a class
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=0)
        valid = targets != 0
        pos_logits = (hidden * items[targets]).sum(-1)
        neg_logits = (hidden[..., None, :] * items[neg_ids]).sum(-1)
        per_position = -F.logsigmoid(pos_logits) - F.logsigmoid(-neg_logits).sum(-1)
        return (per_position * valid).sum() / valid.sum().clamp(min=1)


def plain_step(model: PlainSASRec, optimizer, device):
    def step(inputs):
        inputs = [t if t.device == device else t.to(device, non_blocking=True) for t in inputs]
        loss = model.loss(*inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def trainer_providers(config: SASRecConfig, device, compile_backend: str, backend: str = "auto"):
    """{provider: (step(inputs), batching)}: our trainer's step eager, compiled whole and (CUDA)
    replayed from CUDA graphs; the plain-PyTorch SASRec, eager, on padded batches."""
    providers = {}
    modes = {"eager": {}, "compiled": dict(compile=compile_backend)}
    if device.type == "cuda":
        modes["graph"] = dict(graph=True)
    for name, options in modes.items():
        torch.manual_seed(0)
        attention, losses = training_backends(backend, device)
        model = SASRec(config).to(device).set_backend(attention, loss_backend=losses)
        optimizer = make_optimizer(model.parameters(), 1e-3, 0.0, device)
        providers[name] = (TrainingStep(step_loss_function(model, model, "packed"), optimizer, **options), "packed")
    torch.manual_seed(0)
    plain = PlainSASRec(config).to(device)
    optimizer = make_optimizer(plain.parameters(), 1e-3, 0.0, device)  # ours: a fair comparison
    providers["plain-pytorch"] = (plain_step(plain, optimizer, device), "padded")
    return providers


def run_epoch(step, make, batches, device) -> float:
    """Seconds of one epoch: every batch built by make() on the trainer's background thread,
    one step each, the losses summed on the device and read once at the end."""
    common.synchronize(device)
    started = time.perf_counter()
    total = torch.zeros((), device=device)
    with value_checks(False):
        for inputs in prefetched(make, batches):
            total += step(inputs)
    total.item()
    return time.perf_counter() - started


def warm_up_batches(make, users, per_shape: int = 3) -> list[torch.Tensor]:
    """Up to `per_shape` batches of users of each token count in the epoch: enough to compile
    every shape and to warm up and capture its CUDA graph."""
    seen, chosen = {}, []
    for batch_users in users:
        tokens = make(batch_users)[0].numel()
        if seen.get(tokens, 0) < per_shape:
            seen[tokens] = seen.get(tokens, 0) + 1
            chosen.append(batch_users)
    return chosen


def trainer_main(args) -> list[common.Row]:
    device = common.setup(args)
    env = common.environment(device)
    print(f"sasrec trainer steps on {env.describe()}")
    data = common.read_dataset(common.DATASETS["games"][0])
    split = LeaveOneOutSplit.of(data)
    config = SASRecConfig(num_items=data.num_items, max_len=50, dropout=0.5, loss=args.loss)
    sampler = negative_sampler(config, data, split.train_item_counts())
    pin = device.type == "cuda"
    make = {
        batching: TrainingBatches.of(TrainConfig(batching=batching), split, config, sampler, pin=pin)
        for batching in ("packed", "padded")
    }
    users = epoch_users(split.training_users(), 128, seed=0, epoch=1)
    if args.quick:
        users = users[:16]
    shape = f"Games B=128 L=50 d=50 N={data.num_items} ({len(users)} steps)"
    rows = []
    providers = trainer_providers(config, device, args.compile_backend)
    names = common.selected(args.providers, list(providers), "--providers")
    for name, (step, batching) in [(name, providers[name]) for name in names]:
        generator = torch.Generator().manual_seed(1)  # the same negatives for every provider

        def build(batch_users, batching=batching, generator=generator):
            return make[batching](batch_users, generator)

        # Compile or capture every static shape first, outside the timed epoch; the eager steps
        # warm up on a few batches.
        warm_up = warm_up_batches(make["packed"], users) if name in ("compiled", "graph") else users[:3]
        warm = f" (warm-up {len(warm_up)} steps {run_epoch(step, build, warm_up, device):.1f} s)"
        seconds = run_epoch(step, build, users, device)
        rows.append(trainer_row(env, args, shape, "train epoch", name, seconds * 1e3 / len(users)))
        print(f"  {name:<14} epoch {seconds:7.2f} s  {rows[-1].ms:8.2f} ms/step  {rows[-1].steps_per_s:7.1f} "
              f"steps/s{warm}")  # fmt: skip
    rows += host_rows(env, args, device)
    compare_to_plain(rows)
    note = (
        "The trainer's step on Games (2 blocks, d=50, 1 head, batch 128, L=50, dropout 0.5): `train epoch` rows time "
        "a whole epoch of the trainer's batches (built on its background thread) per step mode; `plain-pytorch` is "
        "a SASRec port on nn.MultiheadAttention, padded [B, L] batches, eager, the same loss and users. `host step` "
        "rows: the same steps at B=4 L=8 d=8 N=32, where the device work is negligible. speedup_vs_best_torch: "
        "steps/s over plain-pytorch's in the same mode."
    )
    common.report("sasrec-trainer", rows, env, args.csv, TRAINER_COLUMNS, note)
    return rows


def trainer_row(env, args, shape, mode, provider, ms) -> common.Row:
    return common.Row(
        benchmark="sasrec-trainer", gpu=env.gpu, torch=env.torch, triton=env.triton, commit=env.commit, shape=shape,
        variant=f"{args.loss} trainer", dtype="float32", mode=mode, provider=provider, status="ok",
        time=common.timestamp(), quick=args.quick, ms=ms, steps_per_s=1e3 / ms,
    )  # fmt: skip


def host_rows(env, args, device) -> list[common.Row]:
    """Host milliseconds per step at a tiny shape (the device work negligible), per provider."""
    config = SASRecConfig(num_items=32, max_len=8, hidden=8, dropout=0.5, loss=args.loss)
    data = SequenceDataset.from_interactions(synthetic_interactions(num_users=64, num_items=32, seed=0))
    split = LeaveOneOutSplit.of(data)
    sampler = negative_sampler(config, data, split.train_item_counts())
    train_config = dict(batch_size=4, token_buckets=1)
    rows = []
    providers = trainer_providers(config, device, args.compile_backend)
    for name, (step, batching) in [(name, providers[name]) for name in common.selected(args.providers, list(providers),
                                                                                       "--providers")]:  # fmt: skip
        make = TrainingBatches.of(TrainConfig(batching=batching, **train_config), split, config, sampler)
        inputs = make(split.training_users()[:4], torch.Generator().manual_seed(0))
        inputs = [t.to(device) for t in inputs]
        with value_checks(False):
            ms = common.bench(lambda step=step, inputs=inputs: step(inputs), device, args.quick)
        rows.append(trainer_row(env, args, "tiny B=4 L=8 d=8 N=32", "host step", name, ms))
        print(f"  host step {name:<14} {ms * 1e3:8.1f} us")
    return rows


def compare_to_plain(rows: list[common.Row]) -> None:
    plain = {r.mode: r for r in rows if r.provider == "plain-pytorch"}
    for r in rows:
        if r.provider != "plain-pytorch" and r.mode in plain:
            r.speedup_vs_best_torch, r.best_torch = common.speedup(r, plain[r.mode]), "plain-pytorch"


if __name__ == "__main__":
    main()
