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
import functools
import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import backends
from ._checks import value_checks
from .backends import Backend
from .data.dataset import InsufficientDataError, LeaveOneOutSplit, SequenceDataset
from .data.packed import PackedBatch, token_buckets
from .data.readers import read_interactions
from .data.synthetic import synthetic_interactions
from .metrics import PROTOCOLS, evaluate
from .models.sasrec import SASRec, SASRecConfig, negative_sampler, sample_negatives
from .training_step import TrainingStep, make_optimizer

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
    weight_decay: float = 0.0  # > 0: AdamW (decoupled weight decay)
    eval_every: int = 20  # epochs between validations
    patience: int = 3  # validations without a better NDCG@10 before stopping
    eval_protocol: str = "sampled"  # the protocol that picks the best checkpoint
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    batching: str = "packed"  # "packed": real tokens only; "padded": [B, max_len] rows, as the paper's code
    token_buckets: int = 4  # packed: the token counts (static shapes) a run's batches are padded to
    backend: str = "auto"
    amp: str | None = None  # "bf16" | "fp16" | None
    compile: bool | str = False  # torch.compile the whole step (forward, loss, backward, update); a str: its backend
    cuda_graph: bool = True  # on CUDA: replay each step from a CUDA graph (not with fp16 or several processes)
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms for the run: bitwise reproducible
    out: str = "runs/default"
    resume: bool = False
    progress: bool = True  # progress bars, when stderr is a terminal; else one log line per epoch

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_every", "patience", "token_buckets"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.min_count < 0:
            raise ValueError(f"min_count: expected an int >= 0, got {self.min_count!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected a value >= 0, got {self.weight_decay!r}")
        if self.eval_protocol not in PROTOCOLS:
            raise ValueError(f"eval_protocol: expected one of {', '.join(PROTOCOLS)}, got {self.eval_protocol!r}")
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching: expected one of {', '.join(BATCHINGS)}, got {self.batching!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp: expected 'bf16', 'fp16' or None, got {self.amp!r}")
        if self.compile and self.amp == "fp16":
            raise ValueError("amp: fp16's GradScaler reads its inf check on the host every step; with compile use bf16")
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
        options.pop("token_bucket", None)  # checkpoints before token_buckets: a multiple, now chosen from the data
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


def training_backends(backend: str, device: torch.device) -> tuple[str, str]:
    """The backends a run trains on, (attention's, the losses'): `auto` on a CPU runs the
    attention on the extension's C++ path where it is built (about twice the reference's
    steps/s on Games: docs/training-step.md) and the losses on the reference, whose matrix
    products are BLAS's (at Games' shape, one thread: full_softmax_loss forward+backward 0.84 s
    against cpp's 4.6 s, sampled_softmax_loss 4.9 ms against 15.9 ms). Otherwise `backend` for
    both (`auto` on CUDA: backends.resolve's choice per op)."""
    if backend == "auto" and device.type == "cpu" and Backend.CPP in backends.available(device):
        return Backend.CPP.value, Backend.AUTO.value
    return backend, backend


def build_model(config: TrainConfig, num_items: int, device: torch.device | str) -> SASRec:
    """The run's model on `device`, on the backends it trains (and evaluates) on there."""
    device = torch.device(device)
    model_config = dataclasses.replace(config.model, num_items=num_items)
    attention, losses = training_backends(config.backend, device)
    return SASRec(model_config).to(device).set_backend(attention, loss_backend=losses)


def _backend_names(model: SASRec, device: torch.device) -> str:
    """The log's backend: 'cpp', or 'cpp, loss on reference' where the loss runs on another."""
    if model.config.loss == "bce" or model.loss_backend is model.backend:
        return model.backend.value
    loss = backends.resolve(model.loss_backend, device, f"{model.config.loss}_loss")
    return f"{model.backend.value}, loss on {loss.value}"


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
        model = build_model(config, state["model_config"]["num_items"], device)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as error:  # RuntimeError: weights that do not fit the config
        raise CheckpointError(f"checkpoint: {path}: not readable by this version ({error})") from error
    return model.eval(), state


def prefetched(make: Callable, items: Iterable, depth: int = 2) -> Iterator:
    """make(item) for each item, computed on a background thread up to `depth` items ahead of
    the consumer (batches are built while the previous step runs); an exception of make()
    (KeyboardInterrupt included) is raised here, at the item it failed on. Leaving the loop
    early stops the thread."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                if stop.is_set():
                    return
                results.put((True, make(item)))
        except BaseException as error:  # handed to the consumer, which raises it
            results.put((False, error))
            return
        results.put((False, None))

    thread = threading.Thread(target=produce, name="seqrec-batches", daemon=True)
    thread.start()
    try:
        while True:
            made, value = results.get()
            if not made:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() waiting for room, then let the thread see `stop`
            try:
                results.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def training_step(step: TrainingStep, inputs) -> torch.Tensor:
    """One optimizer step on a batch's tensors (host, pinned on CUDA); returns the loss, on the
    device and not read (reading it would wait for the device)."""
    return step(inputs)


def train(config: TrainConfig) -> dict:
    """Trains, validates, keeps the best checkpoint, and returns the final test metrics
    of the best model under both protocols ({} when interrupted)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic or previous)
    try:
        return _train(config)
    finally:
        torch.use_deterministic_algorithms(previous)


def epoch_users(users: torch.Tensor, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """This process's batches of training users in an epoch. The order depends on the seed and
    epoch only: the same in every process and after a resume. Each process takes an equal
    share (DDP needs equal steps)."""
    order = torch.randperm(users.numel(), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    share = users.numel() // world
    return users[order[rank * share : (rank + 1) * share]].split(batch_size)


@dataclasses.dataclass
class TrainingBatches:
    """batches(batch_users, generator) -> a training batch's tensors (step_loss_function's
    inputs) on the host, pinned if `pin` (copied to the device without waiting), in static
    shapes: batch_size rows (the epoch's last, shorter batch gets empty rows), and for packed
    batches the smallest of `token_counts` that holds the tokens (a tail of padding tokens).
    Empty rows and tail tokens have no target: they count in no loss and no gradient. The
    negatives are drawn from `generator`."""

    split: LeaveOneOutSplit
    model: SASRecConfig
    batching: str
    batch_size: int
    sampler: object  # negative_sampler(model, ...); None for full_softmax
    token_counts: tuple[int, ...]
    pin: bool = False

    @staticmethod
    def of(config: TrainConfig, split: LeaveOneOutSplit, model: SASRecConfig, sampler, pin: bool = False):
        """The batches of a run: token_counts from the lengths of the training users' windows."""
        tokens = (split.train_lengths[split.training_users()] - 1).clamp(max=model.max_len)  # [U] inputs per user
        counts = token_buckets(tokens, config.batch_size, config.token_buckets, seed=config.seed)
        return TrainingBatches(split, model, config.batching, config.batch_size, sampler, counts, pin)

    def __call__(self, batch_users: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        inputs, targets = self.split.training_batch(batch_users, self.model.max_len)  # [b, L] each
        missing = self.batch_size - batch_users.numel()
        inputs, targets = (F.pad(t, (0, 0, 0, missing)) for t in (inputs, targets))  # [B, L]
        users_of_rows = F.pad(batch_users, (0, missing))  # an empty row draws user 0's (unused) negatives
        if self.batching == "packed":
            batch = PackedBatch.from_padded(inputs, targets, self.model.max_len, token_counts=self.token_counts)
            tensors = [batch.items, batch.positions, batch.cu_seqlens, batch.rows, batch.targets]
            owners = users_of_rows[batch.rows]  # [T]: each token's user
        else:
            tensors, owners = [inputs, targets], users_of_rows
        negatives = sample_negatives(self.model, self.sampler, tensors[-1].shape, users=owners, generator=generator)
        tensors += list(negatives or ())
        return [t.pin_memory() for t in tensors] if self.pin else tensors


def step_loss_function(model: SASRec, encoder, batching: str) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The loss of a batch given as the tensors the trainer builds (the step's inputs):
    packed: items, positions [T], cu_seqlens [B + 1], rows, targets [T]; padded: inputs,
    targets [B, L]; then the negatives (ids, log_q) unless the loss is full_softmax. `encoder`
    is the model or its DDP wrapper."""
    packed = batching == "packed"

    def loss(inputs):
        if packed:
            histories = PackedBatch(*inputs[:5])
            targets, negatives = histories.targets, inputs[5:]
        else:
            histories, targets, negatives = inputs[0], inputs[1], inputs[2:]
        return model.loss_from_hidden(encoder(histories), targets, tuple(negatives) or None)

    return loss


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
    model = build_model(config, data.num_items, device)
    sampler = negative_sampler(model.config, data, split.train_item_counts())  # None for full_softmax
    optimizer = make_optimizer(model.parameters(), config.lr, config.weight_decay, device)
    encoder = DistributedDataParallel(model) if world > 1 else model  # the forward DDP synchronizes
    if config.compile and world > 1:
        raise ValueError("compile: the whole-step compile takes one process (DDP's hooks split the graph)")
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
    graph = config.cuda_graph and device.type == "cuda" and world == 1 and config.amp != "fp16"
    step = TrainingStep(
        step_loss_function(model, encoder, config.batching), optimizer, AMP_DTYPES[config.amp],
        compile=config.compile, graph=graph, scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
    )  # fmt: skip
    batches_of = TrainingBatches.of(config, split, model.config, sampler, pin=device.type == "cuda")
    token_counts = batches_of.token_counts

    log(
        f"{source}: {data.num_users} users, {data.num_items} items, {data.items.numel()} interactions; "
        f"SASRec {model.config.blocks}x{model.config.hidden}, loss {model.config.loss}, "
        f"backend {_backend_names(model, device)}, device {device}"
        + (f", {world} processes" if world > 1 else "")
        + f"; steps {'compiled, ' if config.compile else ''}{'CUDA graphs' if graph else 'eager'}"
        + (f", token counts {', '.join(map(str, token_counts))}" if config.batching == "packed" else "")
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
            batches = epoch_users(users, config.batch_size, config.seed, epoch, rank, world)
            # The loss stays on the device until the epoch ends: no host sync per step.
            total = torch.zeros((), device=device)
            # Negatives from a generator of their own (the batches are built on another thread),
            # seeded by epoch: the same after a resume.
            negatives = torch.Generator().manual_seed(config.seed * 7919 + epoch + 104729)
            epoch_batches = prefetched(functools.partial(batches_of, generator=negatives), batches)
            with value_checks(False):  # the batches are valid by construction; checks would sync
                for inputs in tqdm(epoch_batches, total=len(batches), desc=f"epoch {epoch}", leave=False,
                                   disable=not progress_bars):  # fmt: skip
                    total += training_step(step, inputs)
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
