"""sampled_softmax_loss / full_softmax_loss: every backend vs naive float64, fuzzed."""

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends_under_test import ALL, GPU_ALL, KERNELS
from loss_helpers import check_loss_against_truth, full_pair, sampled_pair
from seqrec_kernels import (
    full_softmax_loss,
    fused_attention,
    fused_attention_varlen,
    sampled_softmax_loss,
    target_ranks,
    topk_items,
)
from seqrec_kernels.backends import triton_interpreter_enabled
from seqrec_kernels.triton import softmax_loss as triton_loss

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NEGATIVE_LAYOUTS = ["shared", "per_sequence", "per_row"]


@st.composite
def sampled_cases(draw, max_rows=300, max_neg=300, max_items=5000, dtypes=DTYPES, dims=(16, 50, 64, 100)):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, max(1, max_rows // batch)))
    return dict(
        batch=batch, length=length, flat=draw(st.booleans()),
        hidden_dim=draw(st.sampled_from(dims)),
        num_items=draw(st.integers(2, max_items)), num_neg=draw(st.integers(1, max_neg)),
        layout=draw(st.sampled_from(NEGATIVE_LAYOUTS)), dtype=draw(st.sampled_from(dtypes)),
        log_q=draw(st.booleans()), remove_hits=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.05, 3.0])),
        ignored_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def make_sampled(case, device="cpu"):
    """hidden, weight, and the sampled_pair arguments of a drawn case."""
    g = torch.Generator().manual_seed(case["seed"])
    batch, length, dim, n, k = case["batch"], case["length"], case["hidden_dim"], case["num_items"], case["num_neg"]
    hidden = torch.randn(batch, length, dim, generator=g)
    weight = torch.randn(n, dim, generator=g) * 0.5
    pos = torch.randint(1, n, (batch, length), generator=g)
    pos[torch.rand(batch, length, generator=g) < case["ignored_fraction"]] = 0  # padding positions
    neg_shape = {"shared": (k,), "per_sequence": (batch, k), "per_row": (batch, length, k)}[case["layout"]]
    neg = torch.randint(0, n, neg_shape, generator=g)
    # Make accidental hits and duplicates certain, not just likely.
    neg.view(-1)[0] = pos.view(-1)[0].clamp(min=1)
    neg.view(-1)[-1] = neg.view(-1)[0]
    if case["flat"]:  # [T, D] form; per-sequence negatives need the [B, L, D] form
        hidden, pos = hidden.reshape(-1, dim), pos.reshape(-1)
        if case["layout"] == "per_row":
            neg = neg.reshape(-1, k)
        elif case["layout"] == "per_sequence":
            hidden, pos = hidden.reshape(batch, length, dim), pos.reshape(batch, length)
    pos_log_q = -torch.rand(pos.shape, generator=g) * 5 if case["log_q"] else None
    neg_log_q = -torch.rand(neg.shape, generator=g) * 5 if case["log_q"] else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    args = dict(pos_ids=to(pos), neg_ids=to(neg), pos_log_q=to(pos_log_q), neg_log_q=to(neg_log_q),
                remove_hits=case["remove_hits"], temperature=case["temperature"])  # fmt: skip
    return hidden.to(case["dtype"]).to(device), weight.to(case["dtype"]).to(device), args


def run_sampled(case, backend, device="cpu"):
    hidden, weight, args = make_sampled(case, device)
    check_loss_against_truth(*sampled_pair(backend, **args), hidden, weight)


@given(case=sampled_cases(dtypes=[torch.float64, torch.float32]))
def test_sampled_reference_matches_naive(case):
    run_sampled(case, "reference")


@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=15)
@given(case=sampled_cases())
def test_sampled_kernel_matches_naive(backend, case):
    run_sampled(case, backend)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_dim", [300, 1024])
def test_sampled_kernel_wide_hidden(backend, dtype, hidden_dim):
    """D > 256: Triton's item gradient goes through column chunks of 256 (the last one
    partly masked at D=300), its other kernels through the longest rows they take. The
    float32 floor grows with D: the C++ CPU path sums D products one after another, which
    rounds more than torch's blocked sums (seen: 6x the naive float32 error at D=1024)."""
    case = dict(batch=2, length=9, flat=False, hidden_dim=hidden_dim, num_items=60, num_neg=20, layout="shared",
                dtype=dtype, log_q=True, remove_hits=True, temperature=1.0, ignored_fraction=0.3,
                seed=int(torch.randint(2**31, ())))  # fmt: skip
    hidden, weight, args = make_sampled(case)
    serial_sums = hidden_dim / 64 if dtype == torch.float32 else 1.0  # 16-bit: the gradients' own rounding dominates
    check_loss_against_truth(*sampled_pair(backend, **args), hidden, weight, floor_scale=serial_sums)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", NEGATIVE_LAYOUTS)
def test_sampled_kernel_deterministic_mode(backend, layout):
    """Under torch.use_deterministic_algorithms the gradient is bitwise reproducible and
    agrees with the scatter-add path."""
    case = dict(batch=3, length=21, flat=False, hidden_dim=50, num_items=40, num_neg=33, layout=layout,
                dtype=torch.float32, log_q=True, remove_hits=True, temperature=1.0, ignored_fraction=0.3,
                seed=7)  # fmt: skip
    hidden, weight, args = make_sampled(case)
    ours, _ = sampled_pair(backend, **args)

    def weight_grad():
        w = weight.clone().requires_grad_()
        ours(hidden, w).sum().backward()
        return w.grad

    scattered = weight_grad()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = weight_grad(), weight_grad()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, scattered, atol=1e-5, rtol=1e-5)
    run_sampled(case, backend)


@pytest.fixture
def shuffled_programs(monkeypatch):
    """Triton's interpreter runs each grid's programs in a random order, drawn from the
    returned generator (a GPU schedules them in any order)."""
    from triton.runtime.interpreter import interpreter_builder as builder

    generator, order = torch.Generator(), []
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx

    def shuffled_grid_dim(nx, ny, nz):
        order[:] = torch.randperm(nx, generator=generator).tolist()
        set_grid_dim(nx, ny, nz)

    monkeypatch.setattr(builder, "set_grid_dim", shuffled_grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_grid_idx(order[x], y, z))
    return generator


@contextlib.contextmanager
def deterministic_algorithms(enabled=True):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.skipif(not triton_interpreter_enabled(), reason="reorders the programs of Triton's interpreter")
@pytest.mark.parametrize("layout", NEGATIVE_LAYOUTS)
def test_sampled_deterministic_item_gradient_ignores_program_order(layout, shuffled_programs):
    """Heavy duplicates (every negative is one of 3 items, each also many rows' positive):
    their float32 sums round differently in another order. Run with the programs in two
    different orders, the deterministic item gradient is bit-identical; the atomics' (the
    control, showing that the order reaches the sums) is not."""
    batch, length, dim, num_items, num_neg = 3, 40, 50, 20, 24
    hidden, weight = torch.randn(batch, length, dim), torch.randn(num_items, dim)
    pos = torch.randint(1, 4, (batch, length))
    pos[:, ::7] = 0  # ignored rows
    neg_shape = {"shared": (num_neg,), "per_sequence": (batch, num_neg), "per_row": (batch, length, num_neg)}[layout]
    ours, _ = sampled_pair("triton", pos, torch.randint(1, 4, neg_shape), remove_hits=False)

    def weight_grad(order_seed, deterministic):
        shuffled_programs.manual_seed(order_seed)
        w = weight.clone().requires_grad_()
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            ours(hidden, w).sum().backward()
        finally:
            torch.use_deterministic_algorithms(previous)
        return w.grad

    assert torch.equal(weight_grad(1, True), weight_grad(2, True))
    assert not torch.equal(weight_grad(1, False), weight_grad(2, False))


def _attention(varlen):
    q, k, v = (torch.randn(3, 2, 45, 50, requires_grad=True) for _ in range(3))
    seq_lens = torch.tensor([45, 30, 1])
    if varlen:
        cu_seqlens = torch.tensor([0, 45, 75, 76], dtype=torch.int32)
        tokens = [t.detach()[:, :, :26].transpose(1, 2).reshape(-1, 2, 50).requires_grad_() for t in (q, k, v)]
        return lambda: fused_attention_varlen(*tokens, cu_seqlens, 45, dropout_p=0.3, backend="triton"), tokens
    return lambda: fused_attention(q, k, v, seq_lens=seq_lens, backend="triton"), (q, k, v)


def _loss(kind, dim=50, dtype=torch.float32):
    hidden, weight = torch.randn(3, 40, dim).to(dtype), torch.randn(20, dim).to(dtype)
    pos = torch.randint(1, 4, (3, 40))  # heavy duplicates: the item gradient's sums depend on their order
    pos[:, ::7] = 0
    hidden.requires_grad_(), weight.requires_grad_()
    if kind == "full":
        return lambda: full_softmax_loss(hidden, weight, pos, backend="triton"), (hidden, weight)
    neg = torch.randint(1, 4, (3, 24))
    return lambda: sampled_softmax_loss(hidden, weight, pos, neg, remove_accidental_hits=False,
                                        backend="triton"), (hidden, weight)  # fmt: skip


def _retrieval(kind):
    hidden, weight = torch.randn(7, 50), torch.randn(300, 50)
    weight[100:140] = weight[60]  # ties: the order among equal scores must not depend on the schedule
    if kind == "topk":
        return lambda: torch.cat([t.double() for t in topk_items(hidden, weight, 30, backend="triton")]), ()
    return lambda: target_ranks(hidden, weight, torch.randint(1, 300, (7,)), backend="triton"), ()


DETERMINISTIC_PATHS = {
    "attention": lambda: _attention(varlen=False),
    "attention varlen dropout": lambda: _attention(varlen=True),
    "full loss": lambda: _loss("full"),
    "sampled loss, deterministic mode": lambda: _loss("sampled"),
    "sampled loss, float32 D=300 (item by item)": lambda: _loss("sampled", dim=300),
    "topk_items": lambda: _retrieval("topk"),
    "target_ranks": lambda: _retrieval("ranks"),
}


@pytest.mark.skipif(not triton_interpreter_enabled(), reason="reorders the programs of Triton's interpreter")
@pytest.mark.parametrize("path", DETERMINISTIC_PATHS)
def test_triton_deterministic_paths_ignore_program_order(path, shuffled_programs):
    """Every Triton path that claims bitwise reproducibility (all but the sampled item
    gradient's atomics outside deterministic mode: the control above) gives bit-identical
    outputs and gradients with its programs run in two different orders."""
    results = []
    for order_seed in (1, 2):
        shuffled_programs.manual_seed(order_seed)
        torch.manual_seed(0)  # the same dropout seed
        run, leaves = DETERMINISTIC_PATHS[path]()
        with deterministic_algorithms():
            out = run()
            out = out[0] if isinstance(out, tuple) else out
            grads = torch.autograd.grad(out.double().square().sum(), leaves) if leaves else ()
        results.append([out, *grads])
    for first, second in zip(*results):
        assert torch.equal(first, second), path


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("layout", NEGATIVE_LAYOUTS)
@pytest.mark.parametrize("num_items", [40, 3000])
def test_sampled_triton_hidden_size_50(num_items, layout, deterministic, monkeypatch):
    """SASRec's D=50 over several row blocks, vs float64. Triton pads the item table when
    its gathers read at least twice its rows (40 items; not 3,000), and hidden for the
    deterministic item gradient: both paths are taken and exact."""
    padded, pad_columns = [], triton_loss._pad_columns

    def recorded(*operands):  # per call: which operands are re-read (padded)
        padded.append([reread for _, reread in operands])
        return pad_columns(*operands)

    monkeypatch.setattr(triton_loss, "_pad_columns", recorded)
    case = dict(batch=3, length=37, flat=False, hidden_dim=50, num_items=num_items, num_neg=20, layout=layout,
                dtype=torch.float32, log_q=True, remove_hits=True, temperature=1.0, ignored_fraction=0.3,
                seed=int(torch.randint(2**31, ())))  # fmt: skip
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        run_sampled(case, "triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    table = num_items == 40
    assert padded == [[table], [deterministic, table]]  # forward: the table; backward: hidden, the table


@st.composite
def full_cases(draw, max_rows=300, max_items=5000, dtypes=DTYPES, dims=(16, 50, 64, 100)):
    return dict(
        rows=draw(st.integers(1, max_rows)), hidden_dim=draw(st.sampled_from(dims)),
        num_items=draw(st.integers(2, max_items)), dtype=draw(st.sampled_from(dtypes)),
        temperature=draw(st.sampled_from([1.0, 0.1])), ignored_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        num_excluded=draw(st.sampled_from([1, 2, triton_loss.MAX_UNROLLED_EXCLUDED + 4])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def run_full(case, backend, device="cpu"):
    g = torch.Generator().manual_seed(case["seed"])
    rows, dim, n = case["rows"], case["hidden_dim"], case["num_items"]
    hidden = torch.randn(rows, dim, generator=g).to(case["dtype"]).to(device)
    weight = (torch.randn(n, dim, generator=g) * 0.5).to(case["dtype"]).to(device)
    count = min(case["num_excluded"], n - 1)  # item 0 and the last count - 1 ids; at least one is kept
    excluded = (0, *range(n - count + 1, n))
    targets = torch.randint(1, n - count + 1, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < case["ignored_fraction"]] = 0
    ours, naive = full_pair(backend, targets.to(device), excluded, case["temperature"])
    check_loss_against_truth(ours, naive, hidden, weight)


@given(case=full_cases(dtypes=[torch.float64, torch.float32]))
def test_full_reference_matches_naive(case):
    run_full(case, "reference")


@pytest.mark.parametrize("backend", KERNELS)
@settings(max_examples=10)  # the interpreter streams every item tile; GPU tests cover more
@given(case=full_cases(max_rows=64, max_items=700))
def test_full_kernel_matches_naive(backend, case):
    run_full(case, backend)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype, scale", [(dtype, 1.0) for dtype in DTYPES] + [(torch.float32, 30.0)])
def test_sharply_peaked_and_huge_logits(backend, dtype, scale):
    """An item row copied from a hidden row makes that row's softmax one-hot; scaling by
    30 makes logits ~1e5, far past exp's float32 range without the max-shift (and past
    float16's range, so that case is float32). The naive float32 computation rounds those
    logits as the kernels do: the rule's baseline grows with them, its floor does not."""
    rows, dim, n = 24, 64, 70
    hidden = torch.randn(rows, dim)
    weight = torch.randn(n, dim) * 0.1
    targets = torch.randint(1, n, (rows,))
    weight[targets[:4]] = hidden[:4] * 3  # peaked: the target dominates
    weight[5] = hidden[4] * 3  # peaked on a negative
    negatives = torch.randint(1, n, (17,))
    h, w = (hidden * scale).to(dtype), (weight * scale).to(dtype)
    check_loss_against_truth(*full_pair(backend, targets), h, w)
    check_loss_against_truth(*sampled_pair(backend, targets, negatives), h, w)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("count", [0, 1, 3, triton_loss.MAX_UNROLLED_EXCLUDED + 1, 40])
def test_full_kernel_excluded_counts(backend, count):
    """Excluded ids anywhere in the catalog: Triton compiles up to MAX_UNROLLED_EXCLUDED of
    them into its kernels and reads more from an int8 mask of the catalog. At D=50, over
    several row blocks and item tiles (Triton pads hidden and the table), vs float64."""
    rows, dim, num_items = 40, 50, 100
    excluded = torch.randperm(num_items)[:count]
    kept = torch.ones(num_items, dtype=torch.bool)
    kept[excluded] = False
    targets = kept.nonzero()[:, 0][torch.randint(num_items - count, (rows,))]
    targets[::5] = -1  # ignored rows
    hidden, weight = torch.randn(rows, dim), torch.randn(num_items, dim) * 0.5
    ours, naive = full_pair(backend, targets, excluded=tuple(excluded.tolist()), ignore_index=-1)
    check_loss_against_truth(ours, naive, hidden, weight)


@pytest.mark.parametrize("backend", ALL)
def test_full_loss_with_whole_item_tiles_excluded(backend):
    """Excluding items 0..63 empties the first item tile of every kernel's tiling (16-64
    items): the online log-sum-exp starts from -inf there and must not turn into NaN."""
    rows, dim, n = 20, 50, 150
    hidden, weight = torch.randn(rows, dim), torch.randn(n, dim)
    targets = torch.randint(64, n, (rows,))
    check_loss_against_truth(*full_pair(backend, targets, excluded=tuple(range(64))), hidden, weight)


@pytest.mark.parametrize("backend", ALL)
def test_reductions_and_all_ignored_batch(backend):
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    pos = torch.randint(1, 30, (2, 5))
    pos[0, :2] = 0
    neg = torch.randint(1, 30, (2, 7))
    rows = sampled_softmax_loss(hidden, weight, pos, neg, reduction="none", backend=backend)
    assert rows.shape == (2, 5) and (rows[0, :2] == 0).all() and (rows[pos != 0] > 0).all()
    summed = sampled_softmax_loss(hidden, weight, pos, neg, reduction="sum", backend=backend)
    mean = sampled_softmax_loss(hidden, weight, pos, neg, backend=backend)
    torch.testing.assert_close(summed, rows.sum())
    torch.testing.assert_close(mean, rows.sum() / 8)
    full_rows, lse = full_softmax_loss(hidden, weight, pos, reduction="none", backend=backend, return_lse=True)
    assert full_rows.shape == lse.shape == (2, 5) and lse.dtype == torch.float32
    assert (lse[pos == 0] == 0).all()  # ignored rows: LSE 0 on every backend
    truth = torch.logsumexp(hidden.detach().double() @ weight.detach()[1:].double().T, -1)  # item 0 excluded
    torch.testing.assert_close(lse[pos != 0].double(), truth[pos != 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full_softmax_loss(hidden, weight, pos, backend=backend), full_rows.sum() / 8)

    ignored = torch.zeros(2, 5, dtype=torch.long)
    for loss in (sampled_softmax_loss(hidden, weight, ignored, neg, backend=backend),
                 full_softmax_loss(hidden, weight, ignored, backend=backend)):  # fmt: skip
        hidden.grad = weight.grad = None
        loss.backward()
        assert loss.item() == 0.0
        assert (hidden.grad == 0).all() and (weight.grad == 0).all()


GPU_DIMS = (16, 50, 64, 100, 128, 300, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_ALL)
@given(case=sampled_cases(dims=GPU_DIMS))
def test_gpu_sampled_matches_naive(backend, case):
    run_sampled(case, backend, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_ALL)
@given(case=full_cases(dims=GPU_DIMS))
def test_gpu_full_matches_naive(backend, case):
    run_full(case, backend, device="cuda")
