"""The C++/CUDA extension seqrec_kernels._C: its ops' own input checks, availability, and
the CUDA sources compiling without a GPU (nvcc for every target architecture, no spills,
the SASS as csrc/nvcc_check.py expects it; the torch glue of the CUDA build against
torch's headers)."""

import collections
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqrec_kernels as sk
from seqrec_kernels import Backend, available, backends
from seqrec_kernels.backends import EXTENSION_ERROR, cpp_op, extension_has_cuda_kernels, resolve
from seqrec_kernels.cli import _auto_choices, main

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


def attention_backward_args(**overrides):
    """attention_bwd_cuda's arguments: dout, q, k, v, out, lse, then the forward's last six."""
    q, k, v, *rest = attention_args(**overrides)
    return [torch.randn_like(q), q, k, v, torch.randn_like(q), torch.zeros(q.shape[:3]), *rest]


def loss_backward_args(forward_args):
    """The *_bwd_cuda op's arguments for a list of full_args / sampled_args: grad_loss first,
    the LSE after the ids and log_q, `deterministic` last (sampled)."""
    hidden, weight, *rest = forward_args
    rows = torch.ones(hidden.shape[0])
    if len(forward_args) == 6:  # full: targets, excluded_ids | temperature, ignore_index
        return [rows, hidden, weight, *rest[:2], rows, *rest[2:]]
    return [rows, hidden, weight, *rest[:4], rows, *rest[4:], False]


def strided(values, dtype=torch.int64):
    """A non-contiguous view of `values` (every other element of a longer tensor)."""
    return torch.tensor(list(values), dtype=dtype).repeat_interleave(2)[::2]


WIDE = dict(hidden=torch.randn(6, 1025), weight=torch.randn(10, 1025))
WIDE_MESSAGE = "hidden: expected D <= 1024 (the kernel backends' limit; backend='reference' has none), got D=1025"


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
    # Index tensors are read through raw pointers: a strided view is an error, not a misread.
    (
        "attention_fwd_cuda",
        attention_args(seq_start=strided([0, 5], torch.int32)),
        ValueError,
        "seq_start: expected a contiguous index tensor",
    ),
    (
        "attention_bwd_cuda",
        attention_backward_args(seq_len=strided([8, 3], torch.int32)),
        ValueError,
        "seq_len: expected a contiguous index tensor",
    ),
    ("sampled_softmax_fwd_cuda", sampled_args(pos_ids=strided(range(1, 7))), ValueError, "pos_ids: expected a contig"),
    (
        "sampled_softmax_fwd_cuda",
        sampled_args(neg_ids=torch.randint(1, 10, (4, 2)).T),
        ValueError,
        "neg_ids: expected a contiguous index tensor, got shape [2, 4] with strides [1, 2]",
    ),
    ("full_softmax_fwd_cuda", full_args(targets=strided(range(1, 7))), ValueError, "targets: expected a contiguous"),
    (
        "full_softmax_bwd_cuda",
        loss_backward_args(full_args(excluded_ids=strided([0, 3], torch.int32))),
        ValueError,
        "excluded_ids: expected a contiguous index tensor",
    ),
    # The loss kernels' hidden limit, forward and backward.
    *[
        (op, args, ValueError, WIDE_MESSAGE)
        for op, args in [
            ("sampled_softmax_fwd_cuda", sampled_args(**WIDE)),
            ("sampled_softmax_bwd_cuda", loss_backward_args(sampled_args(**WIDE))),
            ("full_softmax_fwd_cuda", full_args(**WIDE)),
            ("full_softmax_bwd_cuda", loss_backward_args(full_args(**WIDE))),
        ]
    ],
]


@pytest.mark.parametrize("op, args, error, message", BAD_CALLS, ids=[f"{c[0]}-{c[3]}" for c in BAD_CALLS])
def test_cpp_checks_name_the_argument(op, args, error, message):
    with pytest.raises(error) as raised:
        cpp_op(f"seqrec::{op}")(*args)
    assert message in str(raised.value)


def test_extension_backends_availability_says_why():
    assert Backend.CPP in available("cpu") and Backend.CUDA not in available("cpu")
    with pytest.raises(ValueError, match="'cuda' is not available .* the extension's C.. implementation is 'cpp'"):
        resolve("cuda", torch.device("cpu"), "fused_attention")
    with pytest.raises(ValueError, match="'cpp' is not available .* for CPU tensors"):
        resolve("cpp", torch.device("cuda"), "fused_attention")
    if not extension_has_cuda_kernels():
        assert Backend.CUDA not in available("cuda")
        with pytest.raises(ValueError, match="built without CUDA kernels"):
            resolve("cuda", torch.device("cuda"), "fused_attention")


@pytest.mark.parametrize("extension_has_cuda", [True, False])
def test_auto_on_cuda_takes_the_extension_for_its_ops_and_triton_for_the_rest(monkeypatch, request, extension_has_cuda):
    """On a GPU `auto` runs the extension's ops on `cuda` (faster on the H200, the leaner host
    path) and retrieval, which the extension lacks, on `triton`; all on `triton` where the
    extension has no CUDA kernels. Availability is patched: the choice is tested on any machine."""
    reasons = {Backend.TRITON: None, Backend.CUDA: None if extension_has_cuda else "built without CUDA kernels"}
    monkeypatch.setattr(backends, "_unavailable_reason", lambda backend, device: reasons.get(backend, "unavailable"))
    backends._auto_on_cuda.cache_clear()  # auto's choices are cached: drop those made before (and these, after)
    request.addfinalizer(backends._auto_on_cuda.cache_clear)
    extension = Backend.CUDA if extension_has_cuda else Backend.TRITON
    for op_name in ("fused_attention", "fused_attention_varlen", "sampled_softmax_loss", "full_softmax_loss"):
        assert resolve("auto", torch.device("cuda"), op_name) is extension
    for op_name in ("topk_items", "target_ranks"):
        assert resolve("auto", torch.device("cuda"), op_name) is Backend.TRITON
    assert _auto_choices(torch.device("cuda")) == (
        "cuda for fused_attention, fused_attention_varlen, sampled_softmax_loss, full_softmax_loss; "
        "triton for topk_items, target_ranks"
        if extension_has_cuda
        else "triton for every op"
    )  # what `seqrec info` prints
    reasons[Backend.TRITON] = "triton is not installed"
    backends._auto_on_cuda.cache_clear()
    with pytest.raises(ValueError, match="'auto' has no backend for topk_items on CUDA tensors .'triton': triton is"):
        resolve("auto", torch.device("cuda"), "topk_items")


def test_public_ops_resolve_by_the_names_auto_knows(monkeypatch):
    """The op names the public functions resolve by are those backends.EXTENSION_OPS spells (a
    misspelt one would silently take Triton on a GPU)."""
    names = []
    resolve_as_is = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda b, device, op: names.append(op) or resolve_as_is(b, device, op))
    q = torch.randn(2, 1, 3, 8)
    hidden, weight, targets = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([1, 2, 0])
    sk.fused_attention(q, q, q)
    sk.fused_attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1),
                              torch.tensor([0, 3], dtype=torch.int32), 3)  # fmt: skip
    sk.sampled_softmax_loss(hidden, weight, targets, torch.tensor([3, 4]))
    sk.full_softmax_loss(hidden, weight, targets)
    assert set(names) == backends.EXTENSION_OPS
    sk.topk_items(hidden, weight, 2)
    sk.target_ranks(hidden, weight, targets)
    assert set(names) - backends.EXTENSION_OPS == {"topk_items", "target_ranks"}


def test_info_reports_the_extension(capsys):
    main(["info"])
    output = capsys.readouterr().out
    assert "seqrec_kernels._C: built" in output
    assert "cpu: reference" in output and "cpp" in output.split("cpu:")[1].splitlines()[0]
    assert "auto runs reference for every op" in output.split("cpu:")[1].splitlines()[0]


def _load_nvcc_check():
    spec = importlib.util.spec_from_file_location("nvcc_check", CSRC / "nvcc_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


nvcc_check = _load_nvcc_check()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_and_their_sass_meets_expectations():
    """Each .cu compiled once per architecture (sm_80, sm_90): no spills in the ptxas
    report, and in the SASS of the same object no local memory, HMMA/LDSM/LDGSTS where the
    kernel multiplies 16-bit tiles, 128-bit output stores (STG.128) in the attention kernels,
    registers that allow the CTAs per SM it intends."""
    result = subprocess.run([sys.executable, str(CSRC / "nvcc_check.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for source in ("attention.cu", "softmax_loss.cu"):
        for arch in ("sm_80", "sm_90"):
            assert re.search(rf"^{source} {arch}: \d+ kernels .* 0 spilling, 0 SASS violations$", result.stdout, re.M)
    # A 16-bit tile kernel's row: registers, 256 threads, 2 CTAs/SM (2 intended), no local, HMMA LDSM LDGSTS.
    assert re.search(
        r"^  engine_kernel<__half, 1, false> +\d+ +256 +2 \(2\) +0 +[1-9]\d* +[1-9]\d* +[1-9]", result.stdout, re.M
    )
    # An attention kernel's row, single- and double-buffered K/V (stages 1, 2): HMMA LDSM LDGSTS,
    # and 128-bit global stores (STG.128) of its output rows.
    for stages in (1, 2):
        assert re.search(
            rf"^  attention_fwd_kernel<__half, 64, {stages}, false> +\d+ +128 +\d+ \(2\) +0 +[1-9]\d* +[1-9]\d*"
            r" +[1-9]\d* +[1-9]",
            result.stdout,
            re.M,
        )
    # float32 under 3xTF32: tensor cores (HMMA) from plain shared loads (no LDSM), cp.async, STG.128.
    for kernel in ("attention_fwd_kernel<float, 64, 1, true>", "engine_kernel<float, 0, true>"):
        assert re.search(rf"^  {re.escape(kernel)} +\d+ +\d+ +\d+ \(\d\) +0 +[1-9]\d* +0 +[1-9]", result.stdout, re.M)


def test_sass_check_arithmetic_and_parsing():
    """nvcc_check's occupancy arithmetic, SASS parsing and verdicts, on made-up input."""
    assert nvcc_check.ctas_per_sm(128, 256) == 2  # 4096 registers per warp, 8 warps
    assert nvcc_check.ctas_per_sm(129, 256) == 1  # 4128 round up to 4352 per warp
    assert nvcc_check.ctas_per_sm(255, 128) == 2
    assert nvcc_check.ctas_per_sm(22, 1024) == 2  # thread slots bind first
    assert nvcc_check.ctas_per_sm(16, 32) == 32  # CTA slots
    sass = "\tFunction : _Z1kv\n  /*0000*/   @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;\n  /*0010*/   STL [R1], R0 ;\n"
    assert nvcc_check.parse_sass(sass) == {"_Z1kv": collections.Counter(HMMA=1, STL=1)}
    # 128-bit accesses also count as "<opcode>.128" (sm_90 and sm_80 forms); 64-bit ones do not.
    sass = (
        "\tFunction : _Z1sv\n  /*9630*/   @!P1 STG.E.128 desc[UR16][R2.64], R4 ;\n"
        "  /*89e0*/   STG.E.128 [R2.64], R4 ;\n  /*8a00*/   @P2 STG.E.64 [R2.64], R8 ;\n"
        "  /*8a10*/   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;\n"
    )
    assert nvcc_check.parse_sass(sass) == {
        "_Z1sv": collections.Counter({"STG": 3, "STG.128": 2, "LDGSTS": 1, "LDGSTS.128": 1})
    }
    demangled = "void seqrec::cuda::(anonymous namespace)::engine_kernel<__half, 1, false>(seqrec::cuda::LossArgs)"
    assert nvcc_check.short_name(demangled) == "engine_kernel<__half, 1, false>"
    resources = dict(registers=129, stack=0, shared=0, local=0)
    row = dict(kernel="engine_kernel<__half, 1, false>", source="softmax_loss.cu", arch="sm_90", spills=0,
               launch_threads=256, resources=resources, HMMA=0, LDSM=4, LDGSTS=9, STL=0, LDL=0,
               **{"STG.128": 0})  # fmt: skip
    problems = nvcc_check.check(row)
    assert len(problems) == 2, problems
    assert "129 registers x 256 threads allow 1 CTAs per SM, 2 intended" in problems[0]
    assert "no HMMA in the SASS" in problems[1]
    # The attention kernels store their output rows 16 bytes at a time: STG.128 required.
    attention = {**row, "kernel": "attention_fwd_kernel<__half, 64, false>", "source": "attention.cu"}
    attention.update(launch_threads=128)
    attention.update(resources={**resources, "registers": 144}, HMMA=64, LDSM=36, LDGSTS=15)
    missing = f"attention.cu sm_90 {attention['kernel']}: no STG.128 in the SASS (attention tiles, 16-bit)"
    assert nvcc_check.check(attention) == [missing]
    assert nvcc_check.check({**attention, "STG.128": 4}) == []
    # float32 kernels instantiated for 3xTF32 ("high"): HMMA required, fed by plain shared loads (no LDSM).
    tf32 = {**attention, "kernel": "attention_fwd_kernel<float, 64, true>", "HMMA": 0, "LDSM": 0, "STG.128": 4}
    assert nvcc_check.check(tf32) == [
        f"attention.cu sm_90 {tf32['kernel']}: no HMMA in the SASS (attention tiles, float32 3xTF32)"
    ]
    assert nvcc_check.check({**tf32, "HMMA": 48}) == []
    assert "no entry in nvcc_check.EXPECTED" in nvcc_check.check({**row, "kernel": "new_kernel<float>"})[0]


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
    """The grid `make gpu-check` runs under compute-sanitizer, here reduced (--quick) on the
    C++ CPU path: every case within the tests' tolerance rule."""
    script = Path(__file__).resolve().parent / "sanitizer_grid.py"
    result = subprocess.run([sys.executable, str(script), "cpu", "--quick"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 missed the tolerance" in result.stdout, result.stdout
