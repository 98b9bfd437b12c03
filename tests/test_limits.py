"""The ops' limits are stated once per language (seqrec_kernels/_limits.py, csrc/op_limits.h),
the two tables agree, and each limit is checked before any kernel runs, on every backend,
with one message (the dispatcher's, the Triton launchers' and the C++ ops' alike)."""

import re
from pathlib import Path

import pytest
import torch

from backends_under_test import ALL, CPP, KERNELS, op
from seqrec_kernels import _limits, full_softmax_loss, fused_attention, fused_attention_varlen, sampled_softmax_loss
from seqrec_kernels.ops import attention as attention_ops

ROOT = Path(__file__).resolve().parents[1]
CPP_TABLE = ROOT / "csrc" / "op_limits.h"


def _cpp_limits():
    """{PYTHON_NAME: value} of csrc/op_limits.h: kMaxHeadDim -> MAX_HEAD_DIM."""
    found = re.findall(r"^constexpr int (k\w+) = (\d+);", CPP_TABLE.read_text(), re.M)
    return {re.sub(r"(?<!^)([A-Z])", r"_\1", name[1:]).upper(): int(value) for name, value in found}


def _python_limits():
    return {name: value for name, value in vars(_limits).items() if name.isupper() and isinstance(value, int)}


# Limits of ops the C++ extension does not have (retrieval), so without a C++ twin.
PYTHON_ONLY = {"MAX_KERNEL_K"}


def test_the_two_tables_agree():
    assert _python_limits() == {"MAX_HEAD_DIM": 256, "MAX_KERNEL_HIDDEN_DIM": 1024, "MAX_KERNEL_K": 2048}
    assert _cpp_limits() == {name: value for name, value in _python_limits().items() if name not in PYTHON_ONLY}


def test_no_limit_is_stated_elsewhere():
    """No other source defines a constant of a limit's name (nor the old ones: kMaxDim,
    kMaxLossDim, MAX_HIDDEN_DIM)."""
    names = [*_python_limits(), "MAX_HIDDEN_DIM"]
    python = re.compile(rf"^\s*({'|'.join(names)})\s*=", re.M)
    cpp = re.compile(r"constexpr\s+\w+\s+(kMaxHeadDim|kMaxKernelHiddenDim|kMaxDim|kMaxLossDim)\s*=")
    sources = [*(ROOT / "seqrec_kernels").rglob("*.py"), *(ROOT / "csrc").rglob("*.h"), *(ROOT / "csrc").rglob("*.c*")]
    stated = [
        str(path.relative_to(ROOT))
        for path in sources
        if path not in (ROOT / "seqrec_kernels" / "_limits.py", CPP_TABLE)
        and (python if path.suffix == ".py" else cpp).search(path.read_text())
    ]
    assert stated == []


def _fail_if_run(*args):
    raise AssertionError("a kernel ran")


HEAD_DIM = _limits.MAX_HEAD_DIM + 1
HEAD_DIM_MESSAGE = "q: head dim (the last dimension of {}) must be in 1..256, got 257"


@pytest.mark.parametrize("backend", ALL)
def test_head_dim_limit_on_every_backend(monkeypatch, backend):
    for name in attention_ops._FORWARD_OPS:
        monkeypatch.setitem(attention_ops._FORWARD_OPS, name, _fail_if_run)
    q = torch.randn(1, 1, 4, HEAD_DIM)
    with pytest.raises(ValueError) as raised:
        fused_attention(q, q, q, backend=backend)
    assert str(raised.value) == HEAD_DIM_MESSAGE.format("[B, H, L, D]")
    packed = torch.randn(4, 1, HEAD_DIM)
    with pytest.raises(ValueError) as raised:
        fused_attention_varlen(packed, packed, packed, torch.tensor([0, 4]), 4, backend=backend)
    assert str(raised.value) == HEAD_DIM_MESSAGE.format("[T, H, D]")


@pytest.mark.parametrize("backend", KERNELS)
def test_direct_op_calls_get_the_same_head_dim_message(backend):
    q = torch.randn(1, 1, 4, HEAD_DIM)
    seq = torch.tensor([0], dtype=torch.int32), torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError) as raised:
        op("attention_fwd", backend)(q, q, q, *seq, 4, True, 1.0, 0.0, None)
    assert str(raised.value).startswith(HEAD_DIM_MESSAGE.format("[B, H, L, D]"))


def _wide_loss_inputs():
    dim = _limits.MAX_KERNEL_HIDDEN_DIM + 1
    return torch.randn(2, dim), torch.randn(5, dim), torch.tensor([1, 2])


@pytest.mark.parametrize("backend, op_backend", [("triton", "triton"), pytest.param("cpp", "cuda", marks=CPP.marks)])
@pytest.mark.parametrize("op_name", ["sampled_softmax_fwd", "full_softmax_fwd"])
def test_direct_op_calls_get_the_dispatchers_hidden_message(backend, op_backend, op_name):
    """`cpp` dispatches to the extension's ops, named *_cuda (their CPU kernels)."""
    hidden, weight, ids = _wide_loss_inputs()
    with pytest.raises(ValueError) as dispatched:
        if op_name.startswith("sampled"):
            sampled_softmax_loss(hidden, weight, ids, ids, backend=backend)
        else:
            full_softmax_loss(hidden, weight, ids, backend=backend)
    rest = (ids, ids[None], None, None, 2, True, 1.0, 0) if op_name.startswith("sampled") else (
        ids, torch.tensor([0], dtype=torch.int32), 1.0, 0)  # fmt: skip
    with pytest.raises(ValueError) as direct:
        getattr(torch.ops.seqrec, f"{op_name}_{op_backend}")(hidden, weight, *rest)
    assert str(direct.value).startswith(str(dispatched.value))
    assert str(dispatched.value) == (
        "hidden: expected D <= 1024 (the kernel backends' limit; backend='reference' has none), got D=1025"
    )
