"""Training SASRec: the loop, validation with early stopping, checkpoints and reports.

Checkpoints (`last.pt` every epoch, `best.pt` on a new best validation NDCG@10) are
written to a temporary file and renamed, so an interruption never leaves a torn file.
Ctrl-C saves `last.pt` and exits cleanly; `resume=True` continues from it with the same
optimizer, RNG and early-stopping state.

Under `torchrun --nproc_per_node N` training is data-parallel (DistributedDataParallel;
NCCL on GPUs, gloo on CPUs): each process takes an equal share of every epoch's users,
every process evaluates (so that all take the same early-stopping decision) and process 0
alone writes files and prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ._checks import value_checks
from .data.dataset import InsufficientDataError, LeaveOneOutSplit, SequenceDataset
from .data.packed import PackedBatch
from .data.readers import read_interactions
from .data.synthetic import synthetic_interactions
from .metrics import PROTOCOLS, evaluate
from .models.sasrec import SASRec, SASRecConfig, negative_sampler, sample_negatives

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
BATCHINGS = ("packed", "padded")


def _untrained_model_config() -> SASRecConfig:
    return SASRecConfig(num_items=0)


@dataclasses.dataclass
class TrainConfig:
    """A training run. The model's options are `model`, a SASRecConfig whose num_items
    is set from the data when the model is built (0 until then)."""

    data: str | None = None  # None: the built-in synthetic dataset
    format: str | None = None  # guessed from the file when None
    min_count: int = 0  # k-core filtering
    model: SASRecConfig = dataclasses.field(default_factory=_untrained_model_config)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    eval_every: int = 20  # epochs between validations
    patience: int = 3  # validations without a better NDCG@10 before stopping
    eval_protocol: str = "sampled"  # the protocol that picks the best checkpoint
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batching: str = "packed"  # "packed": real tokens only; "padded": [B, max_len] rows, as the paper's code
    token_bucket: int | None = None  # packed: round T up to a multiple (fixed shapes); None: 128 on CUDA, else 1
    backend: str = "auto"
    amp: str | None = None  # "bf16" | "fp16" | None
    compile: bool = False
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run: bitwise reproducible
    out: str = "runs/default"
    resume: bool = False
    progress: bool = True  # progress bars, when stderr is a terminal; else one log line per epoch

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.min_count < 0:
            raise ValueError(f"min_count: expected an int >= 0, got {self.min_count!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if self.eval_protocol not in PROTOCOLS:
            raise ValueError(f"eval_protocol: expected one of {', '.join(PROTOCOLS)}, got {self.eval_protocol!r}")
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching: expected one of {', '.join(BATCHINGS)}, got {self.batching!r}")
        bucket = self.token_bucket
        if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
            raise ValueError(f"token_bucket: expected None or an int >= 1, got {bucket!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp: expected 'bf16', 'fp16' or None, got {self.amp!r}")
        model = self.model
        for name in ("max_len", "hidden", "heads", "num_negatives"):
            value = getattr(model, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if isinstance(model.blocks, bool) or not isinstance(model.blocks, int) or model.blocks < 0:
            raise ValueError(f"blocks: expected an int >= 0, got {model.blocks!r}")
        if not 0 <= model.dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {model.dropout!r}")

    @staticmethod
    def from_dict(options: dict) -> TrainConfig:
        """A TrainConfig from dataclasses.asdict(config), also the flat form (model options
        beside the training ones) that checkpoints written before `model` existed hold."""
        options = dict(options)
        model = options.pop("model", None)
        model_names = {f.name for f in dataclasses.fields(SASRecConfig)} - {"num_items"}
        flat = {name: options.pop(name) for name in model_names & options.keys()}
        model = {"num_items": 0, **flat, **(model or {})}
        train_names = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = options.keys() - train_names
        if unknown:
            raise ValueError(f"train config: unknown options {sorted(unknown)}")
        return TrainConfig(model=SASRecConfig(**model), **options)


def load_dataset(config: TrainConfig) -> tuple[SequenceDataset, str]:
    if config.data is None:
        interactions = synthetic_interactions(seed=config.seed)
    else:
        interactions = read_interactions(config.data, config.format, config.min_count)
    return SequenceDataset.from_interactions(interactions), interactions.source


def build_model(config: TrainConfig, num_items: int) -> SASRec:
    model_config = dataclasses.replace(config.model, num_items=num_items)
    return SASRec(model_config).set_backend(config.backend)


def save_atomically(state: dict, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


class CheckpointError(ValueError):
    """A file that is not a seqrec checkpoint (or not one this version can read)."""


def load_checkpoint(path: str | Path, device="cpu") -> tuple[SASRec, dict]:
    """A model (in eval mode) and the checkpoint's state from `best.pt`/`last.pt`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as error:  # torch.load raises many types (pickle, zip, EOF) for a foreign file
        raise CheckpointError(f"checkpoint: {path} is not a torch checkpoint ({error})") from error
    if not isinstance(state, dict) or not {"train_config", "model_config", "model"} <= state.keys():
        raise CheckpointError(f"checkpoint: {path} is not a seqrec checkpoint (no train_config, model_config, model)")
    try:
        config = TrainConfig.from_dict(state["train_config"])
        model = build_model(config, state["model_config"]["num_items"])
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as error:  # RuntimeError: weights that do not fit the config
        raise CheckpointError(f"checkpoint: {path}: not readable by this version ({error})") from error
    return model.to(device).eval(), state


def _to_device(value, device: torch.device):
    """Host tensors (in tuples, PackedBatches) on `device`; to a GPU from pinned memory,
    without waiting for the copy."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if device.type != "cuda":
        return value.to(device)
    return value.pin_memory().to(device, non_blocking=True)


def training_step(loss_fn, optimizer, scaler, autocast, batch, negatives) -> torch.Tensor:
    """One optimizer step on a batch already on the device; returns the loss, detached and
    not read (reading it would wait for the device)."""
    with autocast:
        loss = loss_fn(batch, negatives)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _autocast(config: TrainConfig, device: torch.device):
    dtype = AMP_DTYPES[config.amp]  # a known key: TrainConfig checks it
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train(config: TrainConfig) -> dict:
    """Trains, validates, keeps the best checkpoint, and returns the final test metrics
    of the best model under both protocols ({} when interrupted)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic or previous)
    try:
        return _train(config)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(config: TrainConfig) -> dict:
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r} asked for, but torch sees no CUDA device")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    try:
        return _train_process(config, device, rank, world)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train_process(config: TrainConfig, device: torch.device, rank: int, world: int) -> dict:
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    data, source = load_dataset(config)
    split = LeaveOneOutSplit.of(data)
    model = build_model(config, data.num_items).to(device)
    sampler = negative_sampler(model.config, data, split.train_item_counts())  # None for full_softmax
    # foreach: one fused update per step, the default on CUDA; on a CPU it halves the step time too.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98), foreach=True)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    encoder = DistributedDataParallel(model) if world > 1 else model  # the forward DDP synchronizes

    def step_loss(batch, negatives):  # a PackedBatch or padded (inputs, targets) [B, L] each
        histories, targets = (batch, batch.targets) if isinstance(batch, PackedBatch) else batch
        return model.loss_from_hidden(encoder(histories), targets, negatives)

    loss_fn = torch.compile(step_loss) if config.compile else step_loss
    state = dict(epoch=0, best=-math.inf, best_epoch=0, bad_validations=0)
    if config.resume and (out / "last.pt").exists():
        checkpoint = torch.load(out / "last.pt", map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        state = checkpoint["state"]
        log(f"resumed from {out / 'last.pt'} at epoch {state['epoch']}")

    def checkpoint(name):
        if rank != 0:
            return
        save_atomically(dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), rng=torch.get_rng_state(), state=state,
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            train_config=dataclasses.asdict(config), model_config=dataclasses.asdict(model.config),
            source=source,
        ), out / name)  # fmt: skip

    users = split.training_users()
    if users.numel() < world:
        raise InsufficientDataError(
            f"data: {users.numel()} users have a training pair (an item and its next one before the validation and "
            f"test items: 4 or more interactions, or exactly 2); each of the {world} processes needs one"
        )
    bucket = config.token_bucket or (128 if device.type == "cuda" else 1)
    autocast = _autocast(config, device)

    def host_batch(batch_users):
        """A training batch built on the host and sent to the device without waiting:
        (a PackedBatch or padded (inputs, targets) [B, L], negatives or None)."""
        inputs, targets = split.training_batch(batch_users, config.model.max_len)  # [B, L] each
        if config.batching == "packed":
            batch = PackedBatch.from_padded(inputs, targets, config.model.max_len, bucket)
            owners, rows = batch_users[batch.rows], batch.targets.shape  # [T]: each token's user
        else:
            batch, owners, rows = (inputs, targets), batch_users, targets.shape
        negatives = sample_negatives(model.config, sampler, rows, users=owners)
        return _to_device(batch, device), _to_device(negatives, device)

    log(
        f"{source}: {data.num_users} users, {data.num_items} items, {data.items.numel()} interactions; "
        f"SASRec {model.config.blocks}x{model.config.hidden}, loss {model.config.loss}, backend {model.backend.value}, "
        f"device {device}" + (f", {world} processes" if world > 1 else "")
    )
    metrics_file = (out / "metrics.jsonl").open("a") if rank == 0 else None
    # Bars only on a terminal: in a file or CI log they are thousands of \r fragments.
    progress_bars = config.progress and rank == 0 and sys.stderr.isatty()
    interrupted = False
    try:
        while state["epoch"] < config.epochs and state["bad_validations"] < config.patience:
            epoch = state["epoch"] + 1
            model.train()
            started = time.perf_counter()
            # The epoch's order depends on the seed and epoch only: the same in every process
            # and after a resume. Each process takes an equal share (DDP needs equal steps).
            order = torch.randperm(users.numel(), generator=torch.Generator().manual_seed(config.seed * 7919 + epoch))
            share = users.numel() // world
            batches = users[order[rank * share : (rank + 1) * share]].split(config.batch_size)
            # The loss stays on the device until the epoch ends: no host sync per step.
            total = torch.zeros((), device=device)
            with value_checks(False):  # the batches are valid by construction; checks would sync
                for batch_users in tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress_bars):
                    batch, negatives = host_batch(batch_users)
                    total += training_step(loss_fn, optimizer, scaler, autocast, batch, negatives)
            total = total.item()
            seconds = time.perf_counter() - started
            state["epoch"] = epoch
            record = dict(epoch=epoch, loss=total / len(batches), seconds=round(seconds, 2))
            line = f"epoch {epoch}: loss {record['loss']:.4f}, {seconds:.1f} s"
            if epoch % config.eval_every == 0 or epoch == config.epochs:
                validation = evaluate(model, split, "valid", config.eval_protocol, seed=config.seed)
                record["valid"] = validation
                if validation["NDCG@10"] > state["best"]:
                    state.update(best=validation["NDCG@10"], best_epoch=epoch, bad_validations=0)
                    checkpoint("best.pt")
                else:
                    state["bad_validations"] += 1
                log(f"{line}, valid NDCG@10 {validation['NDCG@10']:.4f} HR@10 {validation['HR@10']:.4f}")
            elif not progress_bars:  # no bar to show progress: one line per epoch
                log(line)
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            checkpoint("last.pt")
    except KeyboardInterrupt:
        interrupted = True
        checkpoint("last.pt")
        log(f"\ninterrupted: saved {out / 'last.pt'} at epoch {state['epoch']}; continue with --resume")
    finally:
        if metrics_file:
            metrics_file.close()
    if interrupted:
        return {}
    if world > 1:
        dist.barrier()  # process 0 has written the checkpoints
    best_path = out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"
    best, _ = load_checkpoint(best_path, device)
    report = {protocol: evaluate(best, split, "test", protocol, seed=config.seed) for protocol in PROTOCOLS}
    if rank == 0:
        (out / "test_metrics.json").write_text(json.dumps(dict(best_epoch=state["best_epoch"], **report), indent=2))
    log(format_report(report, f"test metrics of {best_path} (epoch {state['best_epoch']})"))
    return report


def format_report(report: dict[str, dict[str, float]], title: str) -> str:
    names = list(next(iter(report.values())))
    lines = [title, f"{'protocol':<9} " + " ".join(f"{n:>8}" for n in names)]
    lines += [f"{p:<9} " + " ".join(f"{m[n]:>8.4f}" for n in names) for p, m in report.items()]
    return "\n".join(lines)
