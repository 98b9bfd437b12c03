"""The full loss's tuning candidates (seqrec_kernels/triton/softmax_loss.py VARIANT_DEFAULTS):
the catalog split across programs (ITEM_SPLITS) in the forward and the d hidden pass, and the
fused backward (FUSED: both gradients from one logit tile), each forced through the public op
as the tuning sweep runs it, in Triton's interpreter, against the float64 truth by the tests'
rule: odd row counts (not a multiple of the row block), catalogs that do not divide into the
splits, ignored rows, excluded items (held in registers and through the catalog mask), a
temperature, float32 and bfloat16. Each test also checks that the variant was launched. The
`gpu` tests run the sweep's own configurations compiled for the GPU, and the CUDA backend's
candidate (d weight in the input dtype, an extension switch)."""

import contextlib

import pytest
import torch

from backends_under_test import GPU_CUDA
from benchmarks.tune import CANDIDATES
from loss_helpers import check_loss_against_truth, full_pair
from seqrec_kernels import full_softmax_loss, tuning
from seqrec_kernels.backends import EXTENSION_ERROR, triton_interpreter_enabled
from seqrec_kernels.triton import softmax_loss as triton_loss

interpreter = pytest.mark.skipif(not triton_interpreter_enabled(), reason="Triton's interpreter on CPU")

BLOCKS = dict(BLOCK_T=16, BLOCK_N=16, num_warps=4, num_stages=1)  # the interpreter's defaults: several blocks
VARIANTS = {
    "split forward": ("full_softmax_fwd", dict(ITEM_SPLITS=4)),
    "split d hidden": ("full_softmax_bwd", dict(ITEM_SPLITS=3, FUSED=False)),
    "fused backward": ("full_softmax_bwd", dict(ITEM_SPLITS=1, FUSED=True)),
}


@pytest.fixture
def launches(monkeypatch):
    """{kernel name: [the launch's grid and keyword arguments, ...]} of every Triton launch."""
    seen = {}
    kernel_class = type(triton_loss._full_fwd_kernel)
    launch = kernel_class.run

    def recorded(kernel, *args, grid, **kwargs):
        seen.setdefault(kernel.fn.__name__, []).append(dict(kwargs, grid=tuple(grid)))
        return launch(kernel, *args, grid=grid, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recorded)
    return seen


def _case(rows, dim, num_items, num_excluded, seed):
    """hidden [rows, dim], weight [num_items, dim], targets (a quarter ignored: ignore_index -1)
    and excluded ids (item 0 and the last ones, never a target)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(num_items, dim, generator=g) * 0.5
    excluded = (0, *range(num_items - num_excluded + 1, num_items))
    targets = torch.randint(1, num_items - num_excluded + 1, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < 0.25] = -1
    return hidden, weight, targets, excluded


def _check_launched(launches, name, config):
    """The variant reached the kernels: the split grids, or the fused kernel alone."""
    if config.get("FUSED"):
        assert "_full_bwd_hidden_kernel" not in launches
        assert launches["_full_bwd_weight_kernel"][0]["FUSED"] is True
    elif name == "full_softmax_fwd":
        assert launches["_full_fwd_kernel"][0]["SPLIT"] and launches["_full_fwd_kernel"][0]["grid"][1] > 1
        assert "_merge_splits_kernel" in launches
    else:
        assert launches["_full_bwd_hidden_kernel"][0]["SPLIT"] and launches["_full_bwd_hidden_kernel"][0]["grid"][1] > 1
        assert "_sum_splits_kernel" in launches


@interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "dtype, rows, dim, num_items, num_excluded, temperature",
    [
        (torch.float32, 45, 50, 150, 1, 1.0),  # 3 row blocks, the last one partial; 10 item blocks in 4 / 3 splits
        (torch.float32, 37, 16, 97, triton_loss.MAX_UNROLLED_EXCLUDED + 3, 0.1),  # the catalog mask; N % 16 != 0
        (torch.bfloat16, 29, 64, 131, 3, 0.5),
    ],
)
def test_candidate_matches_naive(launches, variant, dtype, rows, dim, num_items, num_excluded, temperature):
    kernel, config = VARIANTS[variant]
    hidden, weight, targets, excluded = _case(rows, dim, num_items, num_excluded, seed=rows * num_items)
    ours, naive = full_pair("triton", targets, excluded, temperature, ignore_index=-1)
    with tuning.forcing(kernel, dict(BLOCKS, **config)):
        check_loss_against_truth(ours, naive, hidden.to(dtype), weight.to(dtype))
    _check_launched(launches, kernel, config)


@interpreter
@pytest.mark.parametrize("variant", VARIANTS)
def test_candidate_with_every_row_ignored_and_a_split_of_excluded_items(launches, variant):
    """All rows ignored: loss 0, LSE 0, zero gradients (no partials are written, the merge
    and the sum write every row). Then items 0..39 excluded: the first splits hold no kept
    item (their max is -inf) and must not turn the merge into NaN."""
    kernel, config = VARIANTS[variant]
    hidden, weight, targets, _ = _case(33, 16, 100, 1, seed=5)
    with tuning.forcing(kernel, dict(BLOCKS, **config)):
        hidden_grad, weight_grad = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, lse = full_softmax_loss(hidden_grad, weight_grad, torch.full_like(targets, -1), ignore_index=-1,
                                      reduction="none", backend="triton", return_lse=True)  # fmt: skip
        loss.sum().backward()
        assert not loss.any() and not lse.any()
        assert not hidden_grad.grad.any() and not weight_grad.grad.any()
        targets = torch.randint(40, 100, (33,))
        ours, naive = full_pair("triton", targets, tuple(range(40)))
        check_loss_against_truth(ours, naive, hidden, weight)
    _check_launched(launches, kernel, config)


@interpreter
def test_fused_backward_is_not_used_in_deterministic_mode(launches):
    """FUSED adds d hidden with atomics: under torch.use_deterministic_algorithms the full
    loss keeps its deterministic kernels."""
    hidden, weight, targets, excluded = _case(20, 16, 40, 1, seed=3)
    hidden.requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with tuning.forcing("full_softmax_bwd", dict(BLOCKS, ITEM_SPLITS=1, FUSED=True)):
            full_softmax_loss(
                hidden, weight, targets, exclude_items=excluded, ignore_index=-1, backend="triton"
            ).backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert launches["_full_bwd_weight_kernel"][0]["FUSED"] is False and "_full_bwd_hidden_kernel" in launches


@pytest.mark.parametrize(
    "max_splits, row_blocks, num_items, expected",
    [
        (4, 3, 150, (4, 48)),  # 10 item blocks of 16: 3 per split, the last split 1
        (8, 3, 100, (7, 16)),  # 7 item blocks: one each
        (8, 512, 10**6, (2, 500_000)),  # 1,024 programs reached with 2 splits
        (8, 2048, 10**6, (1, 10**6)),  # enough row blocks: no split
    ],
)
def test_item_splits(max_splits, row_blocks, num_items, expected):
    assert triton_loss._item_splits(max_splits, row_blocks, num_items, 16) == expected


def _gpu_candidates():
    """The sweep's split and fused candidates of the full loss (benchmarks/tune.py)."""
    return [(kernel, config) for kernel in ("full_softmax_fwd", "full_softmax_bwd") for config, _ in CANDIDATES[kernel]
            if config.get("ITEM_SPLITS", 1) > 1 or config.get("FUSED")]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel, config", _gpu_candidates())
def test_gpu_candidate_matches_naive(launches, kernel, config):
    """The sweep's candidates as compiled for the GPU (several row blocks and splits, the
    last ones partial) against float64, in bfloat16 at D=50 (padded operands; the sweep
    itself checks them at D=64)."""
    dtype, dim = torch.bfloat16, 50
    hidden, weight, targets, excluded = _case(700, dim, 3001, 3, seed=dim)
    ours, naive = full_pair("triton", targets.cuda(), excluded, 0.5, ignore_index=-1)
    with tuning.forcing(kernel, config):
        check_loss_against_truth(ours, naive, hidden.to(dtype).cuda(), weight.to(dtype).cuda())
    _check_launched(launches, kernel, config)


@contextlib.contextmanager
def _item_grad_in_dtype():
    previous = torch.ops.seqrec._set_full_loss_item_grad_in_dtype(True)
    assert previous is False, "the switch starts off (else this compares the candidate with itself)"
    try:
        yield
    finally:
        torch.ops.seqrec._set_full_loss_item_grad_in_dtype(previous)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [GPU_CUDA])
@pytest.mark.parametrize(
    "dtype, rows, dim, num_items",
    [(torch.bfloat16, 300, 64, 5003), (torch.float16, 45, 50, 150), (torch.float32, 700, 64, 777),
     (torch.bfloat16, 13, 64, 20000)],
)  # fmt: skip
def test_gpu_cuda_item_grad_in_dtype_matches_naive(backend, dtype, rows, dim, num_items):
    """The CUDA candidate writing d weight in the input dtype (no float32 buffer, zero fill and
    cast), one item split and several (few rows, a large catalog), against float64."""
    hidden, weight, targets, excluded = _case(rows, dim, num_items, 2, seed=rows)
    ours, naive = full_pair(backend, targets.cuda(), excluded, 0.5, ignore_index=-1)
    with _item_grad_in_dtype():
        check_loss_against_truth(ours, naive, hidden.to(dtype).cuda(), weight.to(dtype).cuda())
        no_rows = torch.zeros(0, dim, dtype=dtype, device="cuda", requires_grad=True)  # no kernel runs: zeros
        item_weight = weight.to(dtype).cuda().requires_grad_()
        full_softmax_loss(no_rows, item_weight, targets[:0].cuda(), reduction="sum", backend=backend).backward()
        assert not item_weight.grad.any()

    def all_rows_ignored():  # rows, but none counts: the engine's no-work branch writes d weight
        item_weight = weight.to(dtype).cuda().requires_grad_()
        rows = hidden.to(dtype).cuda().requires_grad_()
        ignored = torch.full_like(targets, -1).cuda()
        full_softmax_loss(rows, item_weight, ignored, ignore_index=-1, reduction="sum", backend=backend).backward()
        return item_weight.grad

    expected = all_rows_ignored()
    with _item_grad_in_dtype():
        assert torch.equal(all_rows_ignored(), expected) and not expected.any()


@interpreter
@pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))
def test_sweep_times_a_cuda_switch_beside_its_default(monkeypatch):
    """benchmarks/tune.py times a CUDA candidate by setting its extension switch around each
    run, and restores it. On CPU, with a stand-in switch (the extension's item id checks):
    the `cuda` backend rejects CPU tensors, so both settings are logged as errors and nothing
    is written for that kernel, while the class's Triton kernels are tuned as usual."""
    from benchmarks import tune

    seen = []
    monkeypatch.setattr(tune, "CUDA_SWITCHES", {"cuda_full_softmax_bwd": (dict(ON=True), "_set_item_id_checks")})
    monkeypatch.setattr(tune, "_has_cuda_switches", lambda device: True)
    candidates = dict(tune.DRY_RUN_CANDIDATES, cuda_full_softmax_bwd=[(dict(ON=False), 1024)])
    results = tune.tune_class(tune.DRY_RUN_CLASSES[1], torch.device("cpu"), candidates, seen.append)
    cuda_lines = [line for line in seen if "cuda_full_softmax_bwd" in line]
    assert len(cuda_lines) == 3 and "{'ON': True}" in cuda_lines[0] and "{'ON': False}" in cuda_lines[1]
    assert "cuda_full_softmax_bwd" not in results and set(results) == {"full_softmax_fwd", "full_softmax_bwd"}
    assert torch.ops.seqrec._set_item_id_checks(True) is True  # restored after each run
