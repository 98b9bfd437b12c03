"""Per-GPU launch configurations of the Triton kernels, chosen by measurement.

`make gpu-check`'s tuning sweep (benchmarks/tune.py) times candidate configurations of each
tunable kernel on a real GPU and writes the winners to `seqrec_kernels/tuning/<gpu>.json`
(<gpu> the device name with every run of other characters than letters and digits turned
into one '-', e.g. NVIDIA-H100-80GB-HBM3.json). A table maps

    kernel -> key -> {"config": {launch parameter: value}, "ms": winner's time,
                      "default_ms": today's default's time, "runner_up": {...}, "runner_up_ms": ...}

The launchers ask `launch_config(kernel, key, device, default)`: the table's config for the
GPU at hand where it has one for (kernel, key), else `default` (other GPUs, unlisted keys,
CPU tensors). Every candidate is checked against the reference before its time counts, and
today's default is always a candidate, so a table never picks anything slower than today.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path

import torch

TABLE_DIR = Path(__file__).resolve().parent
# kernel -> config forced by `forcing` (the sweep times candidates through the public ops).
_forced: dict[str, dict] = {}
# The caches of what launchers derive from the tables and `forcing` (their launch plans).
_derived: list[dict] = []


def derived_cache() -> dict:
    """A cache for what a launcher derives from launch_config (its launch plans), emptied
    whenever what launch_config answers may change: by clear_caches and around `forcing`."""
    cache: dict = {}
    _derived.append(cache)
    return cache


def clear_caches() -> None:
    """Forgets the tables read and all derived from them: after a table was (re)written, or
    where a test fakes the GPU's name or the table directory."""
    table.cache_clear()
    for cache in _derived:
        cache.clear()


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA-H100-80GB-HBM3': the table's file name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str | None:
    """The GPU's name, or None for tensors that are not on a GPU (no table applies)."""
    if device.type != "cuda":
        return None
    return _cuda_device_name(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def table(name: str) -> dict:
    """The tuning table of the GPU called `name` ({} if none is committed for it)."""
    path = TABLE_DIR / f"{gpu_slug(name)}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def launch_config(kernel: str, key: str, device: torch.device, default: dict) -> dict:
    """`default` updated with the measured winner for (kernel, key) on `device`'s GPU, if any."""
    if kernel in _forced:
        return {**default, **_forced[kernel]}
    name = device_name(device)
    entry = table(name).get(kernel, {}).get(key) if name is not None else None
    return default if entry is None else {**default, **entry["config"]}


@contextlib.contextmanager
def forcing(kernel: str, config: dict):
    """Launches of `kernel` use `config` (over the default and any table) inside the block."""
    _forced[kernel] = config
    clear_caches()
    try:
        yield
    finally:
        del _forced[kernel]
        clear_caches()


def attention_key(dtype: torch.dtype, block_d: int, max_seqlen: int) -> str:
    """The table key of an attention launch: dtype (and mode), padded head dim, length class."""
    return f"{dtype_key(dtype)}/d{block_d}/L{length_bucket(max_seqlen)}"


def loss_key(dtype: torch.dtype, block_d: int, num_items: int) -> str:
    """The table key of a loss launch: dtype (and mode), padded hidden dim, catalog class."""
    return f"{dtype_key(dtype)}/d{block_d}/{catalog_class(num_items)}"


# Catalog classes of the loss keys (the items each row is scored against): SASRec datasets'
# catalogs, mid-size ones, catalog scale. A variant's edge can flip with N (the fused backward
# trades one atomic add per logit saved), so a winner measured at one class never runs at another.
CATALOG_CLASSES = (2**15, 2**18)


def catalog_class(num_items: int) -> str:
    return next((f"n{c}" for c in CATALOG_CLASSES if num_items <= c), f"n>{CATALOG_CLASSES[-1]}")


def length_bucket(max_seqlen: int) -> int:
    """The sequence-length class of an attention key: the next power of two, 64 to 8192."""
    return min(8192, max(64, 1 << max(0, int(max_seqlen) - 1).bit_length()))


def dtype_key(dtype: torch.dtype) -> str:
    """A dtype as a key part; float32 with its matmul precision mode (its kernels differ by it)."""
    name = str(dtype).removeprefix("torch.")
    return f"{name}-{torch.get_float32_matmul_precision()}" if dtype == torch.float32 else name
