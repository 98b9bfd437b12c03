"""fused_attention's contract beyond the numbers: bad input, backend choice, torch.library
registration (opcheck), torch.compile, layouts."""

import logging
import math

import pytest
import torch

from backends_under_test import ALL, GPU_ALL, op
from seqrec_kernels import Backend, available, fused_attention, fused_attention_varlen

BACKENDS = ALL


def qkv(*shape, dtype=torch.float32, requires_grad=False):
    return [torch.randn(*shape, dtype=dtype, requires_grad=requires_grad) for _ in range(3)]


def _padded_call(**overrides):
    q, k, v = qkv(2, 2, 8, 16)
    args = dict(q=q, k=k, v=v, seq_lens=torch.tensor([8, 3]))
    args.update(overrides)
    return lambda: fused_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def _varlen_call(**overrides):
    q, k, v = qkv(7, 2, 16)
    args = dict(q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4)
    args.update(overrides)
    return lambda: fused_attention_varlen(
        args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"), args.pop("max_seqlen"), **args
    )


BAD_INPUTS = [
    ("q rank", _padded_call(q=torch.randn(2, 8, 16)), ValueError, "q: expected 4 dimensions"),
    ("q not a tensor", _padded_call(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
    ("q integer", _padded_call(q=torch.ones(2, 2, 8, 16, dtype=torch.int64)), TypeError, "q: expected dtype"),
    ("k shape", _padded_call(k=torch.randn(2, 2, 9, 16)), ValueError, "k: expected shape (2, 2, 8, 16)"),
    ("v dtype", _padded_call(v=torch.randn(2, 2, 8, 16, dtype=torch.float16)), TypeError, "v: expected dtype"),
    ("v device", _padded_call(v=torch.randn(2, 2, 8, 16, device="meta")), ValueError, "v: expected device"),
    ("head dim", _padded_call(**dict(zip("qkv", qkv(1, 1, 4, 257)))), ValueError, "head dim"),
    ("seq_lens shape", _padded_call(seq_lens=torch.tensor([8])), ValueError, "seq_lens: expected shape (2,)"),
    ("seq_lens rank", _padded_call(seq_lens=torch.tensor([[8, 3]])), ValueError, "seq_lens: expected 1 dimensions"),
    ("seq_lens dtype", _padded_call(seq_lens=torch.tensor([8.0, 3.0])), TypeError, "seq_lens: expected dtype"),
    ("seq_lens negative", _padded_call(seq_lens=torch.tensor([8, -1])), ValueError, "seq_lens: expected values in"),
    ("seq_lens > L", _padded_call(seq_lens=torch.tensor([9, 3])), ValueError, "seq_lens: expected values in [0, 8]"),
    ("padding_side", _padded_call(padding_side="middle"), ValueError, "padding_side: expected one of"),
    ("dropout_p = 1", _padded_call(dropout_p=1.0), ValueError, "dropout_p: expected a value in [0.0, 1.0)"),
    ("dropout_p < 0", _padded_call(dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout_p type", _padded_call(dropout_p="0.1"), TypeError, "dropout_p: expected a float"),
    ("scale nan", _padded_call(scale=float("nan")), ValueError, "scale"),
    ("causal type", _padded_call(causal=1), TypeError, "causal: expected a bool"),
    ("backend unknown", _padded_call(backend="flash"), ValueError, "backend: expected one of"),
    *[
        (
            f"float64 {backend}",
            _padded_call(**dict(zip("qkv", qkv(1, 1, 4, 8, dtype=torch.float64))), seq_lens=None, backend=backend),
            TypeError,
            f"q: the '{backend}' backend takes",
        )
        for backend in ("triton", "cpp")
    ],
    ("varlen rank", _varlen_call(q=torch.randn(1, 7, 2, 16)), ValueError, "q: expected 3 dimensions [T, H, D]"),
    ("cu_seqlens dtype", _varlen_call(cu_seqlens=torch.tensor([0.0, 7.0])), TypeError, "cu_seqlens: expected dtype"),
    ("cu_seqlens short", _varlen_call(cu_seqlens=torch.tensor([0])), ValueError, "cu_seqlens: expected at least 2"),
    ("cu_seqlens start", _varlen_call(cu_seqlens=torch.tensor([1, 3, 7])), ValueError, "cu_seqlens: expected non-dec"),
    ("cu_seqlens end", _varlen_call(cu_seqlens=torch.tensor([0, 3, 8])), ValueError, "from 0 to at most T=7"),
    ("cu_seqlens order", _varlen_call(cu_seqlens=torch.tensor([0, 5, 3, 7])), ValueError, "non-decreasing"),
    ("max_seqlen small", _varlen_call(max_seqlen=3), ValueError, "max_seqlen: expected >= the longest sequence (4)"),
    ("max_seqlen type", _varlen_call(max_seqlen=4.0), ValueError, "max_seqlen: expected an int"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert message in str(raised.value)


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert Backend.TRITON not in available("cpu")
    with pytest.raises(ValueError, match="backend: 'triton' is not available .* CUDA tensors"):
        _padded_call(backend="triton")()


def test_auto_picks_reference_on_cpu_and_logs_it(caplog):
    q, k, v = qkv(1, 1, 5, 8)
    with caplog.at_level(logging.DEBUG, logger="seqrec_kernels"):
        auto = fused_attention(q, k, v, backend=Backend.AUTO)
    assert "picked 'reference'" in caplog.text
    torch.testing.assert_close(auto, fused_attention(q, k, v, backend="reference"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_follow_q_and_strided_inputs_need_no_copy(backend):
    """A [B, L, H, D] projection viewed as [B, H, L, D] works as is; out keeps that layout,
    so out.transpose(1, 2).reshape(B, L, H * D) is free. Non-unit D strides are copied."""
    x = torch.randn(3, 10, 2, 16)  # [B, L, H, D]
    q = x.transpose(1, 2)
    out = fused_attention(q, q, q, backend=backend)
    assert out.stride() == q.stride()
    dense = fused_attention(q.contiguous(), q.contiguous(), q.contiguous(), backend=backend)
    torch.testing.assert_close(out, dense)
    column_major = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)  # stride 1 on L, not D
    torch.testing.assert_close(fused_attention(column_major, q, q, backend=backend), dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    q, k, v = qkv(0, 2, 5, 16, requires_grad=True)
    out = fused_attention(q, k, v, backend=backend)
    assert out.shape == (0, 2, 5, 16)
    q, k, v = qkv(0, 2, 16, requires_grad=True)
    out, lse = fused_attention_varlen(q, k, v, torch.tensor([0, 0], dtype=torch.int32), 0, backend=backend,
                                      return_lse=True)  # fmt: skip
    out.sum().backward()
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0) and q.grad.shape == q.shape
    q, k, v = qkv(4, 2, 16, requires_grad=True)  # no tokens, only a padding tail
    out, lse = fused_attention_varlen(q, k, v, torch.tensor([0, 0], dtype=torch.int32), 0, backend=backend,
                                      return_lse=True)  # fmt: skip
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (out == 0).all() and (lse == -math.inf).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(backend, dropout_p):
    """Schema, fake impl, autograd registration and AOT dispatch of the op pair."""
    fwd = op("attention_fwd", backend).default
    q, k, v = (t.transpose(1, 2) for t in qkv(2, 9, 2, 24))  # strided [B, H, L, D] views
    for t in (q, k, v):
        t.requires_grad_()
    seq_len = torch.tensor([9, 4], dtype=torch.int32)
    seq_start = 9 - seq_len
    seed = torch.tensor([1234]) if dropout_p else None
    torch.library.opcheck(fwd, (q, k, v, seq_start, seq_len, 9, True, 0.25, dropout_p, seed))
    packed = [t.detach().reshape(1, 2, 9 * 2, 24).requires_grad_() for t in (q, k, v)]
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)  # rows 14..17: a padding tail
    torch.library.opcheck(fwd, (*packed, cu[:-1], cu.diff(), 13, False, 0.25, dropout_p, seed))


class TinySelfAttention(torch.nn.Module):
    """What a SASRec block does around the op: project, split heads, attend, merge."""

    def __init__(self, hidden, heads, backend):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)

    def forward(self, x, seq_lens):  # x [B, L, hidden]
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, hidden // self.heads).unbind(2)
        out = fused_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seq_lens=seq_lens, backend=self.backend
        )
        return out.transpose(1, 2).reshape(batch, length, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = TinySelfAttention(hidden=32, heads=2, backend=backend)
    x = torch.randn(3, 11, 32)
    seq_lens = torch.tensor([11, 4, 0])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, seq_lens)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x, seq_lens)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_ALL)
def test_gpu_opcheck_and_compile(backend):
    fwd = op("attention_fwd", backend).default
    q, k, v = (torch.randn(2, 2, 70, 50, device="cuda", requires_grad=True) for _ in range(3))
    seq_len = torch.tensor([70, 33], dtype=torch.int32, device="cuda")
    torch.library.opcheck(fwd, (q, k, v, 70 - seq_len, seq_len, 70, True, 0.2, 0.0, None))
    torch._dynamo.reset()
    model = TinySelfAttention(hidden=64, heads=2, backend=backend).cuda()
    x = torch.randn(4, 50, 64, device="cuda")
    seq_lens = torch.tensor([50, 7, 1, 0], device="cuda")
    out = torch.compile(model, fullgraph=True)(x, seq_lens)
    model.backend = "reference"  # the compiled backend against the definition, not against itself
    torch.testing.assert_close(out, model(x, seq_lens), atol=1e-4, rtol=1e-4)
