"""Shared benchmark plumbing: options, timing, memory, input data, result rows and tables.

Every benchmark measures providers side by side in one process and turns each
measurement into a `Row`; rows are upserted into one CSV (benchmarks/results/results.csv
by default) keyed by `KEY`, and a markdown table of the run is written beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_CSV = RESULTS / "results.csv"
# ../shared/data beside the checkout; .gpu-data/ inside it on a GPU machine (carried there).
DATA_DIRS = [REPO.parent / "shared" / "data", REPO / ".gpu-data"]
DATASETS = {"games": ("games.txt", 23_715), "ml-1m": ("ml-1m-train-sequences.txt", 3416)}  # file, catalog size
OURS = ("triton", "cuda", "cpp")  # the package's kernel backends; every other provider is plain PyTorch
COMPILED = ("compile", "flex", "flex-mask-per-call", "chunked-compile")  # providers through torch.compile
# Relative error (max |out - ref| / max |ref|) above which a provider is flagged "mismatch".
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------- options


def parser(name: str, description: str, shapes: str, providers: Iterable[str]) -> argparse.ArgumentParser:
    """The options every benchmark takes; `shapes` (examples) and `providers` go in the help."""
    result = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = result.add_argument
    add("--quick", action="store_true", help="a few shapes, short timing (CI smoke tests, make gpu-check)")
    add("--csv", type=Path, default=DEFAULT_CSV, help=f"results file to upsert rows into (default: {DEFAULT_CSV})")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:index]")
    add("--shapes", default=None, help=f"comma-separated parts of shape names to run (of: {shapes})")
    add("--providers", default=None, help=f"comma-separated providers to run (of: {', '.join(providers)})")
    return result


def setup(args: argparse.Namespace) -> torch.device:
    """The device of --device, made current. On a CPU, --quick runs single-threaded: it is a
    smoke test, and on small shared CI machines threads only make timings erratic."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda[:index], got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device: {args.device} requested, but this torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif args.quick:
        torch.set_num_threads(1)
    return device


def selected(option: str | None, names: Sequence[str], flag: str, substrings: bool = False) -> list[str]:
    """`names` filtered by a comma-separated option (None: all of them): exact names, or with
    `substrings` the names that contain one of the given parts (--shapes SASRec)."""
    if option is None:
        return list(names)
    wanted = [n.strip() for n in option.split(",") if n.strip()]
    matches = (lambda part, name: part in name) if substrings else (lambda part, name: part == name)
    unknown = [part for part in wanted if not any(matches(part, name) for name in names)]
    if unknown:
        raise SystemExit(f"{flag}: {', '.join(unknown)} matches none of {', '.join(names)}")
    return [name for name in names if any(matches(part, name) for part in wanted)]


def drop_unavailable(names: list[str], device: torch.device) -> list[str]:
    """`names` without our backends that cannot run (or are not worth timing) on `device`,
    saying why. Triton is timed on GPUs only: on a CPU it would run in its interpreter,
    which is for tests, not speed."""
    from seqrec_kernels import available

    usable = {b.value for b in available(device)}
    kept = []
    for name in names:
        if name == "triton" and device.type != "cuda":
            print("triton: skipped, Triton kernels are timed on a GPU only")
        elif name in OURS and name not in usable:
            print(f"{name}: skipped, the backend is not available on {device.type} (see `seqrec info`)")
        else:
            kept.append(name)
    return kept


def skip_compiled(device: torch.device, quick: bool, first_config: bool) -> str | None:
    """Why compiled providers are skipped for this config, or None: on a CPU in --quick
    mode they run on the first config only, since compiling takes tens of seconds there."""
    if device.type == "cpu" and quick and not first_config:
        return "skipped: on a CPU with --quick, torch.compile providers run on the first shape only"
    return None


# ----------------------------------------------------------------------------- data


def data_file(name: str) -> Path:
    for directory in DATA_DIRS:
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{name} not found in any of {[str(d) for d in DATA_DIRS]}")


@functools.cache
def read_dataset(name: str):
    """The dataset as a SequenceDataset (per-user item sequences), read once per process."""
    from seqrec_kernels.data.dataset import SequenceDataset
    from seqrec_kernels.data.readers import read_interactions

    return SequenceDataset.from_interactions(read_interactions(data_file(name)))


def dataset_or_none(name: str):
    """read_dataset(name), or None (with a message) when the file is missing; under CI a
    missing dataset is an error, as the data README asks."""
    try:
        return read_dataset(name)
    except FileNotFoundError as error:
        if in_ci():
            raise
        print(f"  {error}; using uniform lengths in [L/4, L] instead")
        return None


def sample_lengths(
    dataset: str | None, batch: int, max_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, str]:
    """[batch] history lengths and where they came from: the lengths of users drawn from a
    dataset of DATASETS, clipped to max_len (SASRec keeps the last max_len items), or
    uniform in [max_len/4, max_len] (dataset None or missing)."""
    data = dataset_or_none(DATASETS[dataset][0]) if dataset else None
    if data is None:
        return torch.randint(max(1, max_len // 4), max_len + 1, (batch,), generator=generator), "uniform"
    lengths = data.lengths()
    picks = torch.randint(len(lengths), (batch,), generator=generator)
    return lengths[picks].clamp(max=max_len), dataset


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Environment:
    """The machine a run measures, and its measured limits."""

    gpu: str  # the GPU's name, or "CPU: <model>"
    torch: str
    triton: str
    commit: str
    copy_gbps: float  # measured device-to-device copy bandwidth (read + write)
    matmul_tflops: float  # measured dense bf16 matmul throughput

    def describe(self) -> str:
        return (
            f"{self.gpu}, torch {self.torch}, triton {self.triton}, commit {self.commit}; measured limits: "
            f"copy {self.copy_gbps:.0f} GB/s, bf16 matmul {self.matmul_tflops:.1f} TFLOP/s"
        )


@functools.cache
def environment(device: torch.device) -> Environment:
    """Measured once per process and device."""
    return Environment(
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {_cpu_name()}",
        torch=torch.__version__,
        triton=_version("triton"),
        commit=_commit(),
        copy_gbps=_copy_bandwidth(device),
        matmul_tflops=_matmul_rate(device),
    )


def _copy_bandwidth(device: torch.device) -> float:
    src = torch.randn((256 if device.type == "cuda" else 16) * 2**20, device=device)  # 1 GiB / 64 MiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick=device.type == "cpu")
    return 2 * src.numel() * src.element_size() / ms / 1e6  # read + write


def _matmul_rate(device: torch.device) -> float:
    size = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b, device, quick=device.type == "cpu")
    return 2 * size**3 / ms / 1e9


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _commit() -> str:
    """SEQREC_COMMIT when set (a GPU machine given a checkout without .git), else git's HEAD."""
    if os.environ.get("SEQREC_COMMIT"):
        return os.environ["SEQREC_COMMIT"]
    with contextlib.suppress(OSError):
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.strip()
    return "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median milliseconds of fn() after warm-up, in the manner of triton.testing.do_bench:
    the call count comes from a time budget; on a GPU each call is timed by device events
    (no sync between calls, so host overhead shows as it would in a training loop), on a
    CPU by the wall clock."""
    warmup_ms, budget_ms, min_calls = (25, 100, 5) if quick else (100, 400, 10)
    if device.type == "cpu":
        warmup_ms, budget_ms, min_calls = (0, 100, 3) if quick else (50, 1000, 5)
    fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    estimate_ms = max((time.perf_counter() - started) * 1e3 / 3, 1e-3)
    for _ in range(int(warmup_ms / estimate_ms)):
        fn()
    calls = min(1000, max(min_calls, int(budget_ms / estimate_ms)))
    if device.type == "cpu":
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call of fn() allocates beyond what is already allocated (its
    workspace and outputs; the inputs excluded). None on a CPU, which keeps no such count."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    synchronize(device)
    del result
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many copies of the inputs to cycle through so that one pass over them is larger
    than twice the L2 cache (each call then reads its inputs from memory, as in training)."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return min(64, max(1, -(-2 * l2 // max(bytes_per_set, 1))))


def max_rel_error(outputs: Sequence[torch.Tensor], truth: Sequence[torch.Tensor]) -> float:
    """max over outputs of max |out - ref| / max |ref| (compared in float64; NaN counts as inf)."""
    worst = 0.0
    for out, ref in zip(outputs, truth, strict=True):
        out, ref = out.detach().double(), ref.detach().double()
        error = (out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)
        worst = max(worst, float(torch.nan_to_num(error, nan=math.inf)))
    return worst


@dataclasses.dataclass
class Measurement:
    status: str  # ok | mismatch | unchecked (no reference to compare) | out of memory | unsupported: | error:
    ms: float | None = None
    peak_mib: float | None = None
    max_rel_error: float | None = None
    outputs: tuple[torch.Tensor, ...] | None = None  # the reference's checked outputs: the truth for the others


def measure(
    run: Callable[[int], tuple[torch.Tensor, ...]],
    num_sets: int,
    device: torch.device,
    quick: bool,
    truth: Sequence[torch.Tensor] | None,
    tolerance: float,
    is_reference: bool = False,
    select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    check: Callable[[], tuple[torch.Tensor, ...]] | None = None,
) -> Measurement:
    """Checks, then times one provider. run(i) computes the provider's outputs on input
    set i. The outputs of check() (default: run(0), which is also the compile / autotune
    warm-up), after `select` (the parts that must agree), are compared with `truth`, the
    reference's (kept in the result when is_reference); then calls cycle through the sets:
    one more warm-up, one for the peak memory, then the timed ones. Failures become a
    status, never an exception."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # kept to explain a rejection (SDPA says why it skips a backend)
        try:
            outputs = tuple(select(t.detach()) for t in (check or (lambda: run(0)))())
            error = None if truth is None else max_rel_error(outputs, truth)
            if is_reference:
                status = "ok"
            else:
                status = "unchecked" if error is None else ("ok" if error <= tolerance else "mismatch")
            counter = iter(range(10**9))
            call = lambda: run(next(counter) % num_sets)
            call()
            peak = peak_memory_mib(call, device)
            ms = bench(call, device, quick)
            return Measurement(status, ms, peak, error, outputs if is_reference else None)
        except torch.cuda.OutOfMemoryError:
            return Measurement("out of memory")
        except Exception as error:  # noqa: BLE001 - a failing provider is a result to report
            return Measurement(_failure(error, caught))
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _failure(error: Exception, caught: list[warnings.WarningMessage]) -> str:
    """A one-line status for a provider that raised: "unsupported: why" when it rejects these
    inputs (SDPA's warnings give the reason), else "error: ..." (a bug to look at)."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    if "out of memory" in str(error).lower():  # also when raised through torch.compile or a kernel launch
        return "out of memory"
    if isinstance(error, NotImplementedError) or "No viable backend" in first_line:
        reasons = list(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()))
        return f"unsupported: {' / '.join(reasons) or first_line}"[:240]
    return f"error: {type(error).__name__}: {first_line}"[:240]


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass
class Row:
    """One provider at one configuration: a line of results.csv."""

    benchmark: str  # attention | softmax_loss | sasrec
    gpu: str
    torch: str
    triton: str
    commit: str
    shape: str  # e.g. "SASRec-ML-1M B=128 L=200 H=1 D=50"
    variant: str  # attention: lengths (dataset, uniform, dense); losses: sampled | full; sasrec: e.g. "bce packed"
    dtype: str
    mode: str  # forward | forward+backward | train step
    provider: str
    status: str
    time: str = ""
    quick: bool = False
    max_rel_error: float | None = None
    ms: float | None = None  # median
    steps_per_s: float | None = None  # sasrec
    real_tokens: int | None = None  # non-padding tokens per call
    tflops: float | None = None  # over real tokens, the causal half counted
    gbps: float | None = None  # minimum bytes moved over real tokens / time
    peak_mib: float | None = None  # peak memory of one call beyond its inputs
    speedup_vs_reference: float | None = None
    speedup_vs_best_torch: float | None = None  # vs the fastest plain-PyTorch provider that matched
    best_torch: str = ""  # which provider that was
    speedup_vs_padded: float | None = None  # sasrec packed rows: steps/s over the padded batching's
    matmul_fraction: float | None = None  # tflops / measured bf16 matmul rate
    bandwidth_fraction: float | None = None  # gbps / measured copy bandwidth
    goal: str = ""  # the goal this row is judged against (our providers only)
    goal_met: str = ""  # yes | no
    copy_gbps: float | None = None
    matmul_tflops: float | None = None


COLUMNS = [f.name for f in dataclasses.fields(Row)]
KEY = ("gpu", "torch", "triton", "commit", "benchmark", "shape", "variant", "dtype", "mode", "provider")
TIMED = ("ok", "mismatch", "unchecked")  # statuses that come with a time


def new_row(env: Environment, quick: bool, measurement: Measurement, **fields) -> Row:
    return Row(
        gpu=env.gpu, torch=env.torch, triton=env.triton, commit=env.commit, time=timestamp(), quick=quick,
        copy_gbps=env.copy_gbps, matmul_tflops=env.matmul_tflops, status=measurement.status, ms=measurement.ms,
        peak_mib=measurement.peak_mib, max_rel_error=measurement.max_rel_error, **fields,
    )  # fmt: skip


def compare(rows: list[Row], env: Environment, goal: Callable[[Row, dict[str, Row]], tuple[str, bool] | None]):
    """Fills the speedups, the fractions of the measured limits and the goal columns of the
    rows of one configuration (same shape, variant, dtype and mode)."""
    by_provider = {r.provider: r for r in rows}
    reference = by_provider.get("reference")
    reference_ms = reference.ms if reference and reference.status in TIMED else None
    plain = [r for r in rows if r.provider not in OURS and r.status in ("ok", "unchecked")]
    best = min(plain, key=lambda r: r.ms, default=None)
    for r in rows:
        if r.status not in TIMED:
            continue
        if reference_ms:
            r.speedup_vs_reference = reference_ms / r.ms
        if best:
            r.speedup_vs_best_torch, r.best_torch = best.ms / r.ms, best.provider
        if r.tflops is not None:
            r.matmul_fraction = r.tflops / env.matmul_tflops
        if r.gbps is not None:
            r.bandwidth_fraction = r.gbps / env.copy_gbps
    for r in rows:
        judged = goal(r, by_provider) if r.provider in OURS else None
        if judged:
            r.goal, met = judged
            r.goal_met = "yes" if met else "no"


def speedup(row: Row, other: Row | None) -> float | None:
    """How many times faster `row` is than `other` (None when either has no time)."""
    if other is None or other.status not in TIMED or row.status not in TIMED:
        return None
    return other.ms / row.ms


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text).split())


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def upsert(path: Path, rows: list[Row]) -> None:
    """Writes rows into the CSV at path, replacing earlier rows with the same KEY (the same
    GPU, versions, commit, configuration and provider); atomically (temporary + rename)."""
    new = [{c: _cell(getattr(r, c)) for c in COLUMNS} for r in rows]
    keys = {tuple(r[k] for k in KEY) for r in new}
    kept = [r for r in read_rows(path) if tuple(r.get(k, "") for k in KEY) not in keys]
    extra = [c for r in kept for c in r if c not in COLUMNS]  # columns of an older layout survive
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with temporary.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + list(dict.fromkeys(extra)), restval="")
        writer.writeheader()
        writer.writerows(kept + new)
    os.replace(temporary, path)


def markdown_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    header = [c.replace("speedup_vs_", "x ").replace("_fraction", " frac") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(getattr(r, c)) for c in columns) + " |")
    return "\n".join(lines)


def goal_summary(rows: Sequence[Row]) -> str:
    judged = [r for r in rows if r.goal]
    if not judged:
        return "No row of this run is judged against a goal (the goals are set for bf16 on a GPU)."
    met = sum(r.goal_met == "yes" for r in judged)
    lines = [f"Goals: {met} of {len(judged)} rows met."]
    lines += [
        f"- [{'x' if r.goal_met == 'yes' else ' '}] {r.provider} {r.shape} {r.variant} {r.dtype} {r.mode}: {r.goal}"
        for r in judged
    ]
    return "\n".join(lines)


def report(benchmark: str, rows: list[Row], env: Environment, path: Path, columns: Sequence[str], note: str) -> None:
    """Upserts the rows into the CSV at `path`, writes the run's table and goal summary
    to `<benchmark>-<gpu>.md` beside it, and prints both."""
    upsert(path, rows)
    text = "\n\n".join([f"# {benchmark} on {env.describe()}", note, markdown_table(rows, columns), goal_summary(rows)])
    table_path = path.parent / f"{benchmark}-{slug(env.gpu)}.md"
    table_path.write_text(text + "\n")
    print("\n" + text)
    print(f"\n{len(rows)} rows upserted into {path}; table in {table_path}")


def print_config(title: str, rows: Sequence[Row]) -> None:
    """One line per provider as soon as a configuration is done (progress on long runs)."""
    print(title)
    for r in rows:
        if r.status in TIMED:
            extra = "" if r.max_rel_error is None else f"  err {r.max_rel_error:.1e}"
            memory = "" if r.peak_mib is None else f"  {r.peak_mib:9.1f} MiB"
            print(f"  {r.mode:<17} {r.provider:<15} {r.ms:10.4f} ms{memory}{extra}  {r.status}")
        else:
            print(f"  {r.mode:<17} {r.provider:<15} {r.status}")
