"""Device work per call on the Triton path, counted exactly; outputs the kernels write in
full; loss work proportional to the rows that count.

Counted per forward+backward: the Triton kernel launches (a counting wrapper of the
kernels' `run`, as tests/offline_compile.py wraps it) and the aten ops that launch device
work (a TorchDispatchMode, which sees them on CPU tensors as on CUDA ones; views,
allocations and ops that return their input unchanged launch nothing), split into those
of the Triton launchers (inside our torch ops) and those around them (the public API and
autograd). The README's table "Device work per call" gives these counts.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import seqrec_kernels as sk
from attention_helpers import check_against_truth
from loss_helpers import check_loss_against_truth, full_pair, sampled_pair
from seqrec_kernels.backends import triton_interpreter_enabled
from seqrec_kernels.triton import attention as triton_attention
from seqrec_kernels.triton import softmax_loss as triton_loss

aten = torch.ops.aten
LAUNCH_NOTHING = {
    aten.alias, aten.as_strided, aten.detach, aten.expand, aten.permute, aten.select, aten.slice, aten.squeeze,
    aten.t, aten.transpose, aten.unsqueeze, aten.view, aten._unsafe_view, aten._reshape_alias,
    aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.lift_fresh,
}  # fmt: skip


class DeviceWork(TorchDispatchMode):
    """Records the Triton kernels launched and the aten ops that launch device work, the
    latter as `launcher_ops` (inside one of our ops) or `api_ops` (around them)."""

    def __init__(self):
        super().__init__()
        self.kernels, self.launcher_ops, self.api_ops = [], [], []
        self._inside_our_op = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "seqrec":
            # The op's implementation (the Triton launcher; CPU tensors, in the interpreter) runs
            # below the Python key with this mode still on, so that the ops it calls are recorded.
            self._inside_our_op = True
            try:
                with self:
                    return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            finally:
                self._inside_our_op = False
        out = func(*args, **kwargs)
        returns_input = not func._schema.is_mutable and any(out is a for a in args)
        if func.overloadpacket not in LAUNCH_NOTHING and not returns_input:
            (self.launcher_ops if self._inside_our_op else self.api_ops).append(func.overloadpacket.__name__)
        return out


@pytest.fixture
def device_work(monkeypatch):
    """A DeviceWork mode whose `kernels` lists every Triton launch made while it is on."""
    mode = DeviceWork()
    kernel_class = type(triton_attention._attention_fwd_kernel)  # JITFunction, or the interpreter's
    launch = kernel_class.run

    def counted(kernel, *args, **kwargs):
        mode.kernels.append(kernel.fn.__name__)
        with _disable_current_modes():  # the interpreter's own tensor copies are no device work
            return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", counted)
    return mode


def _attention_padded(length=40, head_dim=16):
    q, k, v = (torch.randn(3, 2, length, head_dim, requires_grad=True) for _ in "qkv")
    seq_lens, grad = torch.tensor([length, 7, 0]), torch.randn(3, 2, length, head_dim)
    return lambda: sk.fused_attention(q, k, v, seq_lens=seq_lens, backend="triton").backward(grad)


def _attention_packed():
    q, k, v = (torch.randn(50, 2, 16, requires_grad=True) for _ in "qkv")
    cu_seqlens, grad = torch.tensor([0, 30, 40], dtype=torch.int32), torch.randn(50, 2, 16)  # 10 tail rows
    return lambda: sk.fused_attention_varlen(q, k, v, cu_seqlens, 30, backend="triton").backward(grad)


def _loss(kind, hidden_dim=16, exclude_items=(0,)):
    hidden = torch.randn(40, hidden_dim, requires_grad=True)
    weight = torch.randn(30, hidden_dim, requires_grad=True)
    targets = torch.randint(1, 20, (40,))
    targets[::3] = 0  # ignored rows
    if kind == "full":
        return lambda: sk.full_softmax_loss(
            hidden, weight, targets, exclude_items=exclude_items, backend="triton"
        ).backward()
    neg_ids = torch.randint(1, 30, (8,) if kind == "sampled shared" else (40, 8))
    return lambda: sk.sampled_softmax_loss(hidden, weight, targets, neg_ids, backend="triton").backward()


# (kernels, aten ops in the launchers, aten ops around them) per forward + backward, float32.
# Before the kernels wrote their outputs in full, the attention launchers also called
# zeros_like x 5 and full, the loss launchers zeros/zeros_like x 4 and a contiguous copy of
# the (expanded) loss gradient; the losses had no compaction kernels.
ATTENTION_KERNELS = [
    "_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
]  # fmt: skip
# D % 16 != 0 over several tiles: q, k, v padded before the forward; q, k, v, dout after delta.
PADDED_ATTENTION_KERNELS = [
    "_pad_rows_kernel", "_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_pad_rows_kernel",
    "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel",
]  # fmt: skip
SAMPLED_KERNELS = ["_compact_rows_kernel", "_sampled_fwd_kernel", "_compact_rows_kernel", "_sampled_bwd_kernel"]
FULL_KERNELS = [
    "_compact_rows_kernel", "_full_fwd_kernel", "_compact_rows_kernel", "_full_bwd_hidden_kernel",
    "_full_bwd_weight_kernel",
]  # fmt: skip
# D=20 (not a multiple of 16), 3 row blocks and 2 item blocks of 16: one pad launch per op
# call (sampled: the table, gathered 64 >= 2 x 30 rows; full: the table, then both operands).
PADDED_SAMPLED_KERNELS = [
    "_compact_rows_kernel", "_pad_columns_kernel", "_sampled_fwd_kernel", "_compact_rows_kernel",
    "_pad_columns_kernel", "_sampled_bwd_kernel",
]  # fmt: skip
PADDED_FULL_KERNELS = [
    "_compact_rows_kernel", "_pad_columns_kernel", "_full_fwd_kernel", "_compact_rows_kernel",
    "_pad_columns_kernel", "_full_bwd_hidden_kernel", "_full_bwd_weight_kernel",
]  # fmt: skip
ATOMICS_TARGET = ["zeros_like"]  # the float32 item gradient the atomics accumulate into
REDUCE_MEAN = ["clamp", "eq", "ne", "bitwise_and", "sum", "sum", "clamp", "div"]  # _valid_rows, _reduce
MEAN_BACKWARD = ["ones_like", "div"]
LSE_GRAD = []  # the LSE output's gradient is not materialized (it was a zeros launch)
LOSS_AROUND = [*REDUCE_MEAN, *MEAN_BACKWARD, *LSE_GRAD]
EXPECTED = {
    # seq_lens.to(int32), seq_start = L - seq_lens
    "attention padded": (_attention_padded, ATTENTION_KERNELS, [], ["_to_copy", "rsub", *LSE_GRAD]),
    "attention packed": (_attention_packed, ATTENTION_KERNELS, [], ["sub", *LSE_GRAD]),  # cu_seqlens.diff()
    # D=50: L=40 spans two tiles of 32 (the interpreter's largest block), L=32 one, which pads nothing.
    "attention padded D=50": (
        lambda: _attention_padded(head_dim=50),
        PADDED_ATTENTION_KERNELS,
        [],
        ["_to_copy", "rsub", *LSE_GRAD],
    ),
    "attention padded D=50, one tile": (
        lambda: _attention_padded(length=32, head_dim=50),
        ATTENTION_KERNELS,
        [],
        ["_to_copy", "rsub", *LSE_GRAD],
    ),
    "sampled shared": (lambda: _loss("sampled shared"), SAMPLED_KERNELS, ATOMICS_TARGET, LOSS_AROUND),
    "sampled per row": (lambda: _loss("sampled per row"), SAMPLED_KERNELS, ATOMICS_TARGET, LOSS_AROUND),
    "full": (lambda: _loss("full"), FULL_KERNELS, [], LOSS_AROUND),
    "sampled shared D=20": (lambda: _loss("sampled shared", 20), PADDED_SAMPLED_KERNELS, ATOMICS_TARGET, LOSS_AROUND),
    "sampled per row D=20": (lambda: _loss("sampled per row", 20), PADDED_SAMPLED_KERNELS, ATOMICS_TARGET, LOSS_AROUND),
    "full D=20": (lambda: _loss("full", 20), PADDED_FULL_KERNELS, [], LOSS_AROUND),
    # More than MAX_UNROLLED_EXCLUDED excluded items: each launcher fills their int8 mask.
    "full, 10 excluded": (
        lambda: _loss("full", exclude_items=(0, *range(20, 29))),
        FULL_KERNELS,
        ["zeros", "index_put_"] * 2,
        LOSS_AROUND,
    ),
}


@pytest.mark.parametrize("call", sorted(EXPECTED))
def test_device_work_per_call(call, device_work):
    make, kernels, launcher_ops, api_ops = EXPECTED[call]
    run = make()
    with sk.value_checks(False), device_work:  # value checks read ids on the host: not the hot path
        run()
    assert device_work.kernels == kernels
    assert device_work.launcher_ops == launcher_ops
    assert device_work.api_ops == api_ops


class _Uninitialized:
    """The torch module, except that empty/empty_like fill what they return with NaN (or -1
    for integers), so that an output element no kernel writes is seen."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(math.nan if t.is_floating_point() else -1)

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture
def uninitialized(monkeypatch):
    for module in (triton_attention, triton_loss):
        monkeypatch.setattr(module, "torch", _Uninitialized())


@pytest.mark.parametrize("length, head_dim", [(21, 16), (41, 50)])
@pytest.mark.parametrize("form", ["left", "right", "packed"])
def test_attention_writes_every_output_element(form, length, head_dim, uninitialized):
    """Padding rows (left, right, and the packed form's tail past cu_seqlens[-1]) get out 0,
    LSE -inf and zero gradients from the kernels, the outputs being uninitialized. At D=50
    over two tiles, so is the zero-padded copy of the operands: every column read is written."""
    q, k, v = (torch.randn(3, 2, length, head_dim) for _ in "qkv")
    seq_lens = torch.tensor([length, 7, 0])
    padding_side = "right" if form == "right" else "left"
    check_against_truth(
        q, k, v, seq_lens, padding_side, True, "triton", varlen=form == "packed", tail=5 * (form == "packed")
    )


def test_attention_without_rows_writes_padding(uninitialized):
    """max_seqlen = 0 (every sequence empty): every row is padding, written all the same."""
    q, k, v = (torch.randn(6, 2, 16, requires_grad=True) for _ in "qkv")
    out, lse = sk.fused_attention_varlen(q, k, v, torch.tensor([0, 0]), 0, backend="triton", return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (out == 0).all() and (lse == -math.inf).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("hidden_dim", [16, 50])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", ["shared", "per_sequence", "per_row", "full"])
def test_loss_writes_every_output_element_over_many_segments(
    layout, deterministic, hidden_dim, uninitialized, monkeypatch
):
    """Uninitialized outputs, segments of 16 rows (several per group), 70% ignored rows: every
    loss and gradient matches the float64 truth, and ignored rows have loss, LSE and d hidden 0.
    At D=50 the operands' zero-padded copies are uninitialized too: every column is written."""
    monkeypatch.setattr(triton_loss, "MAX_SEGMENT_ROWS", 16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        _check_loss_written_in_full(layout, hidden_dim)
    finally:
        torch.use_deterministic_algorithms(previous)


def _check_loss_written_in_full(layout, hidden_dim):
    batch, length, num_items = 3, 37, 50
    hidden, weight = torch.randn(batch, length, hidden_dim), torch.randn(num_items, hidden_dim) * 0.5
    targets = torch.randint(1, num_items, (batch, length))
    targets[torch.rand(batch, length) < 0.7] = 0
    targets[1] = 0  # a sequence with no row that counts
    if layout == "full":
        ours, naive = full_pair("triton", targets)
        _, lse = sk.full_softmax_loss(hidden, weight, targets, backend="triton", return_lse=True)
        assert (lse[targets == 0] == 0).all()
    else:
        neg_shape = {"shared": (20,), "per_sequence": (batch, 20), "per_row": (batch, length, 20)}[layout]
        ours, naive = sampled_pair("triton", targets, torch.randint(0, num_items, neg_shape))
    check_loss_against_truth(ours, naive, hidden, weight)
    hidden = hidden.requires_grad_()
    (d_hidden,) = torch.autograd.grad(ours(hidden, weight).sum(), hidden)
    assert (ours(hidden, weight)[targets == 0] == 0).all() and (d_hidden[targets == 0] == 0).all()


@pytest.mark.skipif(not triton_interpreter_enabled(), reason="counts tiles in Triton's interpreter")
@pytest.mark.parametrize("layout", ["shared", "per_row", "full"])
def test_loss_work_follows_the_rows_that_count(layout, monkeypatch):
    """With 90% of the rows ignored, forward + backward compute ~10% of the logit tiles
    (_negative_logits / _item_logits calls, every kernel), not all of them."""
    tiles = []
    for name in ("_negative_logits", "_item_logits"):
        tile = getattr(triton_loss, name)
        monkeypatch.setattr(triton_loss, name, lambda *args, tile=tile: tiles.append(1) or tile(*args))

    num_rows, num_items = 1280, 32  # a full segment of 1,024 rows and a partial one
    hidden, weight = torch.randn(num_rows, 16, requires_grad=True), torch.randn(num_items, 16, requires_grad=True)

    def tiles_computed(counted_rows):
        targets = torch.zeros(num_rows, dtype=torch.long)
        targets[torch.randperm(num_rows)[:counted_rows]] = torch.randint(1, num_items, (counted_rows,))
        tiles.clear()
        if layout == "full":
            loss = sk.full_softmax_loss(hidden, weight, targets, backend="triton")
        else:
            neg_ids = torch.randint(1, num_items, (16,) if layout == "shared" else (num_rows, 16))
            loss = sk.sampled_softmax_loss(hidden, weight, targets, neg_ids, backend="triton")
        loss.backward()
        return len(tiles)

    every_row, a_tenth = tiles_computed(num_rows), tiles_computed(num_rows // 10)
    assert 0.1 <= a_tenth / every_row <= 0.15, (a_tenth, every_row)
