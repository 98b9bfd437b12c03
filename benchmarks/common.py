"""Shared benchmark plumbing: timing, input rotation, physical limits, result records."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import subprocess
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# ../shared/data beside the checkout; .gpu-data/ inside it on a GPU machine (carried there).
DATA_DIRS = [REPO.parent / "shared" / "data", REPO / ".gpu-data"]


def data_file(name: str) -> Path:
    for directory in DATA_DIRS:
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{name} not found in any of {[str(d) for d in DATA_DIRS]}")


def history_lengths(name: str) -> list[int]:
    """Per-user history lengths of a dataset: `games.txt`-style "user item" lines, or one
    space-separated sequence per line (`ml-1m-train-sequences.txt`)."""
    path = data_file(name)
    with path.open() as f:
        if name == "ml-1m-train-sequences.txt":
            return [len(line.split()) for line in f if line.strip()]
        return list(Counter(line.split()[0] for line in f if line.strip()).values())


def sample_lengths(name: str, batch: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    """[batch] lengths drawn from the dataset's users, clipped to max_len (the last items)."""
    lengths = torch.tensor(history_lengths(name))
    picks = torch.randint(len(lengths), (batch,), generator=generator)
    return lengths[picks].clamp(max=max_len)


@dataclasses.dataclass
class Environment:
    gpu: str
    torch: str
    triton: str
    commit: str
    copy_gbps: float  # measured device-to-device copy bandwidth
    matmul_tflops: float  # measured dense bf16 matmul throughput

    @staticmethod
    def measure() -> Environment:
        import triton

        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return Environment(
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            triton=triton.__version__,
            commit=commit or "unknown",
            copy_gbps=_copy_bandwidth(),
            matmul_tflops=_matmul_throughput(),
        )


def _copy_bandwidth() -> float:
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _matmul_throughput() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def bench(fn, quick: bool = False) -> float:
    """Median milliseconds of fn() on the GPU after warm-up (device events)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200, return_mode="median")


def rotation_count(bytes_per_input_set: int) -> int:
    """How many input copies to cycle so that one pass is larger than twice the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, -(-2 * l2 // max(bytes_per_input_set, 1)))


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"
