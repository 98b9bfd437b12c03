"""The C++/CUDA extension seqrec_kernels._C: its ops' own input checks, availability, and
the CUDA sources compiling without a GPU (nvcc for every target architecture, no spills;
the torch glue of the CUDA build against torch's headers)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqrec_kernels import Backend, available
from seqrec_kernels.backends import EXTENSION_ERROR, cpp_op, extension_has_cuda_kernels, resolve
from seqrec_kernels.cli import main

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def attention_args(**overrides):
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    seq_len = torch.tensor([8, 3], dtype=torch.int32)
    args = dict(q=q, k=k, v=v, seq_start=8 - seq_len, seq_len=seq_len, max_seqlen=8, causal=True, scale=0.25,
                dropout_p=0.0, dropout_seed=None)  # fmt: skip
    args.update(overrides)
    return list(args.values())


def sampled_args(**overrides):
    args = dict(hidden=torch.randn(6, 8), weight=torch.randn(10, 8), pos_ids=torch.randint(1, 10, (6,)),
                neg_ids=torch.randint(1, 10, (2, 4)), pos_log_q=None, neg_log_q=None, rows_per_group=3,
                remove_hits=True, temperature=1.0, ignore_index=0)  # fmt: skip
    args.update(overrides)
    return list(args.values())


def full_args(**overrides):
    args = dict(hidden=torch.randn(6, 8), weight=torch.randn(10, 8), targets=torch.randint(1, 10, (6,)),
                excluded_ids=torch.tensor([0], dtype=torch.int32), temperature=1.0, ignore_index=0)  # fmt: skip
    args.update(overrides)
    return list(args.values())


# Direct calls of the C++ ops bypass the Python checks: the C++ ones must hold.
BAD_CALLS = [
    ("attention_fwd_cuda", attention_args(q=torch.randn(2, 8, 16)), ValueError, "q: expected 4 dimensions"),
    ("attention_fwd_cuda", attention_args(q=torch.randn(2, 2, 8, 16).double()), TypeError, "q: the 'cuda' backend"),
    ("attention_fwd_cuda", attention_args(k=torch.randn(2, 2, 9, 16)), ValueError, "k: expected shape"),
    ("attention_fwd_cuda", attention_args(v=torch.randn(2, 2, 8, 16).half()), TypeError, "v: expected dtype"),
    (
        "attention_fwd_cuda",
        attention_args(q=torch.randn(2, 2, 16, 8).transpose(-1, -2)),
        ValueError,
        "q: expected unit",
    ),
    ("attention_fwd_cuda", attention_args(**{n: torch.randn(1, 1, 4, 300) for n in "qkv"}), ValueError, "head dim"),
    ("attention_fwd_cuda", attention_args(seq_len=torch.tensor([8, 3])), TypeError, "seq_len: expected dtype int32"),
    ("attention_fwd_cuda", attention_args(seq_len=torch.tensor([8, 9], dtype=torch.int32)), ValueError, "lie in rows"),
    ("attention_fwd_cuda", attention_args(max_seqlen=-1), ValueError, "max_seqlen: expected an int >= 0"),
    ("attention_fwd_cuda", attention_args(dropout_p=0.5), ValueError, "dropout_seed: expected a [1] seed tensor"),
    ("attention_fwd_cuda", attention_args(dropout_p=1.0), ValueError, "dropout_p: expected a value in"),
    ("sampled_softmax_fwd_cuda", sampled_args(hidden=torch.randn(2, 3, 8)), ValueError, "hidden: expected 2 dim"),
    ("sampled_softmax_fwd_cuda", sampled_args(weight=torch.randn(10, 7)), ValueError, "weight: expected D=8"),
    ("sampled_softmax_fwd_cuda", sampled_args(pos_ids=torch.full((6,), 10)), ValueError, "pos_ids: expected item ids"),
    ("sampled_softmax_fwd_cuda", sampled_args(neg_ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "K >= 1"),
    ("sampled_softmax_fwd_cuda", sampled_args(rows_per_group=2), ValueError, "rows_per_group: expected G *"),
    ("sampled_softmax_fwd_cuda", sampled_args(neg_log_q=torch.zeros(4)), ValueError, "neg_log_q: expected shape"),
    ("sampled_softmax_fwd_cuda", sampled_args(temperature=0.0), ValueError, "temperature: expected a value > 0"),
    ("full_softmax_fwd_cuda", full_args(targets=torch.randint(1, 10, (5,))), ValueError, "targets: expected shape"),
    ("full_softmax_fwd_cuda", full_args(excluded_ids=torch.arange(10, dtype=torch.int32)), ValueError, "excludes all"),
    ("full_softmax_fwd_cuda", full_args(excluded_ids=torch.tensor([3, 1], dtype=torch.int32)), ValueError, "sorted"),
]


@pytest.mark.parametrize("op, args, error, message", BAD_CALLS, ids=[f"{c[0]}-{c[3]}" for c in BAD_CALLS])
def test_cpp_checks_name_the_argument(op, args, error, message):
    with pytest.raises(error) as raised:
        cpp_op(f"seqrec::{op}")(*args)
    assert message in str(raised.value)


def test_cuda_backend_availability_says_why():
    assert Backend.CUDA in available("cpu")  # the C++ CPU implementation
    if not extension_has_cuda_kernels():
        assert Backend.CUDA not in available("cuda")
        with pytest.raises(ValueError, match="built without CUDA kernels"):
            resolve("cuda", torch.device("cuda"), "fused_attention")


def test_info_reports_the_extension(capsys):
    main(["info"])
    output = capsys.readouterr().out
    assert "seqrec_kernels._C: built" in output
    assert "cpu: reference" in output and "cuda" in output.split("cpu:")[1].splitlines()[0]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_for_every_arch_without_spills():
    result = subprocess.run([sys.executable, str(CSRC / "nvcc_check.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sm_80" in result.stdout and "sm_90" in result.stdout


CUDA_INCLUDE = Path("/usr/local/cuda/include")


@pytest.mark.skipif(
    shutil.which("g++") is None or not (CUDA_INCLUDE / "cuda_runtime_api.h").exists(), reason="needs g++ and CUDA"
)
def test_cuda_glue_compiles_against_torch_headers():
    """csrc/ops_cuda.cpp is only built with a CUDA torch; check its C++ here, with the
    CPU torch's headers (which carry c10/cuda) and the CUDA toolkit's."""
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in [*include_paths(), str(CUDA_INCLUDE)]]
    command = ["g++", "-fsyntax-only", "-std=c++17", "-w", "-DC10_USING_CUSTOM_GENERATED_MACROS", *includes]
    result = subprocess.run([*command, str(CSRC / "ops_cuda.cpp")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sanitizer_grid_runs_on_cpu():
    """The grid `make gpu-check` runs under compute-sanitizer, here on the C++ CPU path."""
    script = Path(__file__).resolve().parent / "sanitizer_grid.py"
    result = subprocess.run([sys.executable, str(script), "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
