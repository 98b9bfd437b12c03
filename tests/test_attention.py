"""fused_attention / fused_attention_varlen: every backend vs naive float64, fuzzed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attention_helpers import check_against_truth, make_qkv
from backends_under_test import ALL, GPU_ALL, GPU_CUDA, KERNELS
from seqrec_kernels.triton import attention as triton_attention

HEAD_DIMS = [16, 32, 50, 64, 40, 59, 111, 128]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def attention_cases(draw, max_batch=5, max_heads=4, max_len=80, head_dims=HEAD_DIMS, dtypes=DTYPES):
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_len))
    lengths = st.one_of(st.sampled_from([0, 1, length]), st.integers(0, length))
    return dict(
        batch=batch,
        heads=draw(st.integers(1, max_heads)),
        length=length,
        head_dim=draw(st.sampled_from(head_dims)),
        dtype=draw(st.sampled_from(dtypes)),
        seq_lens=draw(st.lists(lengths, min_size=batch, max_size=batch)),
        padding_side=draw(st.sampled_from(["left", "right"])),
        causal=draw(st.booleans()),
        strided=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_case(case, backend, device="cpu", **kwargs):
    torch.manual_seed(case["seed"])  # dout and the dropout seed: the same when hypothesis replays a case
    generator = torch.Generator().manual_seed(case["seed"])
    q, k, v = make_qkv(
        case["batch"], case["heads"], case["length"], case["head_dim"], case["dtype"],
        strided=case["strided"], generator=generator,
    )  # fmt: skip
    q, k, v = (t.detach().to(device).requires_grad_() for t in (q, k, v))
    seq_lens = torch.tensor(case["seq_lens"], device=device)
    check_against_truth(q, k, v, seq_lens, case["padding_side"], case["causal"], backend, **kwargs)


@given(case=attention_cases(dtypes=[torch.float64, torch.float32]))
def test_reference_matches_naive_float64(case):
    run_case(case, "reference")


@pytest.mark.parametrize("backend", KERNELS)
@given(case=attention_cases())
def test_kernel_matches_naive(backend, case):
    run_case(case, backend)


@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=10)  # the interpreter is slowest on the dropout hash
@given(case=attention_cases(max_len=48), dropout_p=st.sampled_from([0.1, 0.5, 0.9]))
def test_kernel_dropout_matches_naive_with_same_mask(backend, case, dropout_p):
    run_case(case, backend, dropout_p=dropout_p)


@given(case=attention_cases(dtypes=[torch.float64]), dropout_p=st.sampled_from([0.1, 0.5]))
def test_reference_dropout_matches_naive_with_same_mask(case, dropout_p):
    run_case(case, "reference", dropout_p=dropout_p)


@pytest.mark.parametrize("backend", ALL)
@given(case=attention_cases(max_batch=4), tail=st.one_of(st.just(0), st.integers(1, 70)))
def test_varlen_matches_padded_truth_and_its_tail_is_padding(backend, case, tail):
    """Rows past cu_seqlens[-1] belong to no sequence: zero out and gradients, -inf LSE."""
    case["strided"] = False  # packed inputs are [T, H, D]
    run_case(case, backend, varlen=True, tail=tail)


@given(
    case=attention_cases(dtypes=[torch.float64]),
    dropout_p=st.sampled_from([0.1, 0.5]),
    tail=st.one_of(st.just(0), st.integers(1, 70)),
)
def test_reference_varlen_dropout_matches_naive_with_same_mask(case, dropout_p, tail):
    case["strided"] = False
    run_case(case, "reference", varlen=True, dropout_p=dropout_p, tail=tail)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("head_dim", [1, 7, 256])
def test_extreme_head_dims(backend, head_dim):
    case = dict(batch=2, heads=2, length=33, head_dim=head_dim, dtype=torch.float32, seq_lens=[33, 17],
                padding_side="left", causal=True, strided=False, seed=head_dim)  # fmt: skip
    run_case(case, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal, dropout_p", [(True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("form", ["strided", "packed"])
@pytest.mark.parametrize("head_dim", [50, 100])
def test_triton_pads_head_dims_off_16_over_several_tiles(head_dim, form, causal, dropout_p, dtype, monkeypatch):
    """D % 16 != 0 and L = 70 over several tiles (of 32 in the interpreter): the forward reads
    q, k, v and the backward q, k, v, dout from zero-padded copies (rows 64 or 112 wide), and
    every output still matches the truth. Strided: SASRec's [B, L, H, D] views."""
    padded = []  # operands per _pad_rows call
    pad_rows = triton_attention._pad_rows
    monkeypatch.setattr(triton_attention, "_pad_rows", lambda *args: padded.append(len(args) - 2) or pad_rows(*args))
    q, k, v = make_qkv(3, 2, 70, head_dim, dtype, strided=form == "strided")
    check_against_truth(
        q, k, v, torch.tensor([70, 41, 0]), "left", causal, "triton", dropout_p=dropout_p, varlen=form == "packed",
        tail=5 * (form == "packed"),
    )  # fmt: skip
    assert padded == [3, 4]


@pytest.mark.parametrize("backend", ALL)
def test_large_logits_stay_finite(backend):
    """Scaled scores up to ~150 (exp overflows float32 past 88): the online softmax must
    rescale, never overflow. A float32 score s is rounded to within eps |s| (and the kernels'
    base-2 exponent multiplies it by
    log2(e) first, a rounding the naive baseline's natural exp does not make): every
    probability may move by that much, so the floor of out grows with the largest score
    (out_floor_scale = max |s| / 8: the floor counts 16 ulps, so 2 eps |s| per unit of out's
    term scale), far below out itself (assert_flash_rule rejects a floor that would accept
    zeros). The backward recomputes probabilities from the float32 LSE, as FlashAttention
    does: the gradients' floors grow with the LSE (attention_helpers.term_bounds)."""
    q, k, v = (torch.randn(2, 2, 37, 64) for _ in range(3))
    q, k = q * 6, k * 6  # scores of 1e3 move the gradients' rounding past their floors as well
    max_score = ((q @ k.transpose(-1, -2)) / 8).abs().max().item()
    check_against_truth(
        *(t.requires_grad_() for t in (q, k, v)), torch.tensor([37, 20]), "left", True, backend,
        out_floor_scale=max_score / 8,
    )  # fmt: skip


# GPU: the same checks at larger shapes on CUDA, through the compiled kernels.
@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_ALL)
@given(case=attention_cases(max_batch=8, max_heads=4, max_len=300))
def test_gpu_matches_naive(backend, case):
    run_case(case, backend, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", GPU_CUDA])
@given(case=attention_cases(max_batch=8, max_len=300), dropout_p=st.sampled_from([0.1, 0.5]))
def test_gpu_kernel_dropout_and_varlen(backend, case, dropout_p):
    run_case(case, backend, device="cuda", dropout_p=dropout_p)
    case["strided"] = False
    run_case(case, backend, device="cuda", varlen=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", GPU_CUDA])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["strided", "packed"])
@pytest.mark.parametrize("head_dim", [25, 51])
def test_gpu_odd_16bit_head_dims_over_several_tiles(backend, head_dim, form, dtype):
    """Odd 16-bit head dims (SASRec's 50 split over 2 heads is 25) over sequences longer than
    one tile: the cuda glue copies q, k, v, dout into rows zero-padded to a multiple of 8
    (16-byte cp.async instead of 2-byte loads), Triton to a multiple of 16; every output
    keeps the caller's width and matches the truth; padding rows and a packed tail past
    cu_seqlens[-1] come back zero (written by the kernels, no fill launches)."""
    case = dict(batch=3, heads=2, length=150, head_dim=head_dim, dtype=dtype, seq_lens=[150, 97, 0],
                padding_side="left", causal=True, strided=form == "strided", seed=head_dim)  # fmt: skip
    run_case(case, backend, device="cuda", dropout_p=0.2, varlen=form == "packed", tail=7 * (form == "packed"))
