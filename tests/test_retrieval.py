"""topk_items / target_ranks: each backend against torch.topk and a naive count on the
whole [B, N] score matrix in float64, fuzzed; the contract beyond the numbers (ties, fill
values, bad input, opcheck, torch.compile, the reference's memory independent of N); and
SASRec's recommendations and full-ranking metrics unchanged from the [B, N] path (on the
synthetic data, and on Games where ../shared/data has it)."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from backends_under_test import CPP, op
from seqrec_kernels import target_ranks, topk_items
from seqrec_kernels.backends import cpp_op
from seqrec_kernels.data.dataset import LeaveOneOutSplit, SequenceDataset
from seqrec_kernels.data.packed import PackedBatch
from seqrec_kernels.data.readers import read_interactions
from seqrec_kernels.data.synthetic import synthetic_interactions
from seqrec_kernels.metrics import evaluate, ranking_metrics
from seqrec_kernels.models.sasrec import SASRec, SASRecConfig
from seqrec_kernels.ops._library import FORWARD_SCHEMAS
from seqrec_kernels.reference import retrieval as reference

BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- the truth


def candidates(exclude, exclude_items, num_items):
    """[B, N] True where item j is a candidate of row b (exclude's zeros are padding)."""
    mask = torch.ones(exclude.shape[0], num_items, dtype=torch.bool)
    mask[:, list(exclude_items)] = False
    for row, items in enumerate(exclude):
        mask[row, items[items != 0]] = False
    return mask


def naive_scores(hidden, weight):
    return hidden.double() @ weight.double().T  # [B, N], exact for the inputs as given (rounded to their dtype)


def naive_topk(scores, mask, k):
    """The k best candidates per row from the whole score matrix: values by torch.topk, ids
    by a stable sort (torch.topk leaves the order of ties open); (-inf, -1) past the last."""
    scores = torch.cat([scores.masked_fill(~mask, -math.inf), scores.new_full((scores.shape[0], k), -math.inf)], 1)
    values = scores.topk(k, dim=1).values
    ids = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(scores.gather(1, ids), values)
    return values, torch.where(values == -math.inf, -1, ids)


def naive_ranks(scores, mask, targets, tolerance=0.0):
    """(fewest, most) candidates other than the target scoring above it, counting those
    within `tolerance` of the target's score as below (fewest) or above (most)."""
    target = scores.gather(1, targets[:, None])
    others = mask & (torch.arange(scores.shape[1]) != targets[:, None])
    return ((scores > target + tolerance) & others).sum(1), ((scores > target - tolerance) & others).sum(1)


# ----------------------------------------------------------------------------- fuzzing


@st.composite
def cases(draw, max_rows, max_items, ks):
    num_items = draw(st.integers(1, max_items))
    return dict(
        rows=draw(st.integers(1, max_rows)), num_items=num_items, dim=draw(st.sampled_from([8, 16, 50, 64])),
        k=draw(ks), ties=draw(st.booleans()), num_exclude=draw(st.integers(0, 8)),
        exclude_items=tuple(i for i in draw(st.sampled_from([(0,), (), (0, 1, 5)])) if i < num_items),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**31 - 1)),
    )  # fmt: skip


def make(case, dtype=None):
    """hidden [B, D], weight [N, D], exclude [B, M], targets [B]: integer-valued inputs (heavy
    ties, exact in every dtype) or Gaussian ones; each row excludes its two best items and
    random others (some padding), and row 0's target is one of its excluded items."""
    g = torch.Generator().manual_seed(case["seed"])
    rows, num_items, dim = case["rows"], case["num_items"], case["dim"]
    if case["ties"]:
        hidden, weight = (
            torch.randint(-2, 3, (rows, dim), generator=g),
            torch.randint(-2, 3, (num_items, dim), generator=g),
        )
    else:
        hidden, weight = torch.randn(rows, dim, generator=g), torch.randn(num_items, dim, generator=g)
    dtype = dtype or case["dtype"]
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    best = naive_scores(hidden, weight).topk(min(2, num_items), dim=1).indices  # inside the top-k
    others = torch.randint(0, num_items, (rows, case["num_exclude"]), generator=g)  # mostly outside it
    exclude = torch.cat([best, others], 1)[:, : case["num_exclude"]]
    targets = torch.randint(0, num_items, (rows,), generator=g)
    if exclude.shape[1]:
        targets[0] = exclude[0, 0]
    return hidden, weight, exclude, targets


def check_topk(case, backend, dtype=None, device="cpu"):
    hidden, weight, exclude, _ = make(case, dtype)
    k, exact = case["k"], case["ties"]
    scores, ids = topk_items(hidden.to(device), weight.to(device), k, exclude=exclude.to(device),
                             exclude_items=case["exclude_items"], backend=backend)  # fmt: skip
    scores, ids = scores.cpu(), ids.cpu()
    assert scores.shape == ids.shape == (case["rows"], k) and ids.dtype == torch.int64
    truth = naive_scores(hidden, weight)
    mask = candidates(exclude, case["exclude_items"], case["num_items"])
    values, expected = naive_topk(truth, mask, k)
    if exact:  # integer-valued: every backend scores exactly, so the tie rule decides every id
        assert torch.equal(ids, expected)
        assert torch.equal(scores.double(), values)
        return
    # Gaussian: scores within float32 rounding; ids may differ only between near-equal scores.
    tolerance = 1e-5 * (hidden.double().abs() @ weight.double().abs().T).max().item() + 1e-12
    assert torch.equal(ids == -1, expected == -1)  # the same number of candidates, so the same fill
    real = ids >= 0
    assert ((scores.double() - values).abs() <= tolerance)[real].all()
    assert (scores[~real] == -math.inf).all()
    assert mask.gather(1, ids.clamp(min=0))[real].all(), "an excluded item was returned"
    assert ((truth.gather(1, ids.clamp(min=0)) - scores.double()).abs() <= tolerance)[real].all()
    for row in range(case["rows"]):
        chosen = ids[row][real[row]]
        assert chosen.unique().numel() == chosen.numel(), "an item was returned twice"


def check_ranks(case, backend, dtype=None, device="cpu"):
    hidden, weight, exclude, targets = make(case, dtype)
    ranks = target_ranks(hidden.to(device), weight.to(device), targets.to(device), exclude=exclude.to(device),
                         exclude_items=case["exclude_items"], backend=backend).cpu()  # fmt: skip
    assert ranks.shape == (case["rows"],) and ranks.dtype == torch.int64
    mask = candidates(exclude, case["exclude_items"], case["num_items"])
    tolerance = 0.0 if case["ties"] else 1e-5 * (hidden.double().abs() @ weight.double().abs().T).max().item()
    fewest, most = naive_ranks(naive_scores(hidden, weight), mask, targets, tolerance)
    assert ((fewest <= ranks) & (ranks <= most)).all(), (ranks, fewest, most)


@pytest.fixture
def small_chunks(monkeypatch):
    """Reference chunks of 256 items (the least), so that small catalogs span many chunks."""
    monkeypatch.setattr(reference, "CHUNK_SCORES", 1)


@settings(max_examples=40)
@given(case=cases(max_rows=40, max_items=3000, ks=st.integers(1, 300) | st.sampled_from([1024])))
def test_reference_topk_and_ranks_against_the_score_matrix(case):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "CHUNK_SCORES", 1)  # chunks of 256 items
        check_topk(case, "reference")
        check_ranks(case, "reference")
        check_topk(case, "reference", torch.float64)
        check_ranks(case, "reference", torch.float64)


@settings(max_examples=12)
@given(case=cases(max_rows=20, max_items=300, ks=st.integers(1, 40) | st.sampled_from([100])))
def test_triton_topk_and_ranks_against_the_score_matrix(case):
    check_topk(case, "triton")
    check_ranks(case, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases(max_rows=300, max_items=20000, ks=st.integers(1, 300) | st.sampled_from([1024])))
def test_gpu_topk_and_ranks_against_the_score_matrix(backend, case):
    """The compiled Triton kernels (and the reference on CUDA) over larger catalogs."""
    check_topk(case, backend, device="cuda")
    check_ranks(case, backend, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_1024_beyond_the_candidates(backend, small_chunks):
    """k = 1,024 over 300 items: 299 candidates at most (one row has none), then (-inf, -1)."""
    case = dict(rows=3, num_items=300, dim=16, k=1024, ties=True, num_exclude=6, exclude_items=(0,),
                dtype=torch.float32, seed=1)  # fmt: skip
    check_topk(case, backend)
    hidden, weight, _, _ = make(case)
    everything = torch.arange(300).expand(3, -1).clone()
    everything[1:] = 0  # rows 1 and 2 exclude nothing beyond the padding item
    scores, ids = topk_items(hidden, weight, 1024, exclude=everything, backend=backend)
    assert (ids[0] == -1).all() and (scores[0] == -math.inf).all()
    assert (ids[1:, :299] > 0).all() and (ids[1:, 299:] == -1).all() and (scores[1:, 299:] == -math.inf).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_break_by_the_lower_id_and_ranks_count_strictly_higher(backend):
    weight = torch.ones(100, 8)
    weight[[70, 40, 90]] = 2.0  # three better items, then 96 equal ones
    hidden = torch.ones(2, 8)
    exclude = torch.tensor([[40, 3, 0], [0, 0, 0]])
    scores, ids = topk_items(hidden, weight, 6, exclude=exclude, backend=backend)
    assert ids.tolist() == [[70, 90, 1, 2, 4, 5], [40, 70, 90, 1, 2, 3]]
    assert scores.tolist() == [[16.0, 16.0, 8.0, 8.0, 8.0, 8.0], [16.0, 16.0, 16.0, 8.0, 8.0, 8.0]]
    # Item 50 ties with 95 others: only the better items count; the excluded 40 does not.
    ranks = target_ranks(hidden, weight, torch.tensor([50, 50]), exclude=exclude, backend=backend)
    assert ranks.tolist() == [2, 3]
    # A target that is itself excluded (a repeated item) still gets its rank; so does item 0.
    assert target_ranks(hidden, weight, torch.tensor([40, 0]), exclude=exclude, backend=backend).tolist() == [0, 3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_and_globally_excluded_items_count_once(backend):
    hidden, weight = torch.ones(1, 4), torch.arange(10.0)[:, None].expand(10, 4).contiguous()  # item j scores 4j
    exclude = torch.tensor([[9, 9, 8, 0, 1, 9, 8]])  # 9 and 8 twice or more; 1 also in exclude_items
    ranks = target_ranks(hidden, weight, torch.tensor([2]), exclude=exclude, exclude_items=(0, 1), backend=backend)
    assert ranks.tolist() == [5]  # 3, 4, 5, 6, 7
    _, ids = topk_items(hidden, weight, 3, exclude=exclude, exclude_items=(0, 1), backend=backend)
    assert ids.tolist() == [[7, 6, 5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_single_item(backend):
    scores, ids = topk_items(torch.randn(0, 8), torch.randn(5, 8), 3, backend=backend)
    assert scores.shape == ids.shape == (0, 3)
    assert target_ranks(torch.randn(0, 8), torch.randn(5, 8), torch.zeros(0, dtype=torch.long),
                        backend=backend).shape == (0,)  # fmt: skip
    scores, ids = topk_items(torch.randn(2, 8), torch.randn(1, 8), 2, exclude_items=(), backend=backend)
    assert ids.tolist() == [[0, -1], [0, -1]] and (scores[:, 1] == -math.inf).all()


# ----------------------------------------------------------------------------- memory


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (views excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # no new memory
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(fn, *args) -> int:
    with LargestTensor() as mode:
        fn(*args)
    return mode.largest


@pytest.mark.parametrize("k", [5, 300])
def test_reference_memory_does_not_grow_with_n(k, monkeypatch):
    """The reference's largest temporary is one chunk's scores (or the merge of two top-k
    lists), the same for N = 2,000 and 16,000; the [B, N] scores it avoids show up under
    the same recorder."""
    monkeypatch.setattr(reference, "CHUNK_SCORES", 8 * 512)  # 8 rows: chunks of 512 items
    rows, dim = 8, 16
    hidden, exclude = torch.randn(rows, dim), torch.randint(0, 2000, (rows, 20))
    targets, excluded_ids = torch.randint(0, 2000, (rows,)), torch.tensor([0], dtype=torch.int32)
    largest = {}
    for num_items in (2000, 16_000):
        weight = torch.randn(num_items, dim)
        largest[num_items] = (
            largest_tensor(reference.topk_forward, hidden, weight, exclude, excluded_ids, k),
            largest_tensor(reference.ranks_forward, hidden, weight, targets, exclude, excluded_ids),
        )
        assert largest_tensor(torch.matmul, hidden, weight.T) >= rows * num_items  # the recorder sees [B, N]
    assert largest[2000] == largest[16_000]
    assert max(largest[2000]) <= rows * (512 + 2 * k)


# ----------------------------------------------------------------------------- the contract


def _args(**overrides):
    args = dict(hidden=torch.randn(3, 8), item_weight=torch.randn(20, 8))
    args.update(overrides)
    return args


def _topk(k=4, **overrides):
    args = _args(**overrides)
    return lambda: topk_items(args.pop("hidden"), args.pop("item_weight"), k, **args)


def _ranks(targets=None, **overrides):
    args = _args(**overrides)
    targets = torch.tensor([1, 2, 3]) if targets is None else targets
    return lambda: target_ranks(args.pop("hidden"), args.pop("item_weight"), targets, **args)


BAD_INPUTS = [
    ("hidden rank", _topk(hidden=torch.randn(2, 3, 8)), ValueError, "hidden: expected 2 dimensions [B, D]"),
    ("hidden integer", _topk(hidden=torch.ones(3, 8, dtype=torch.long)), TypeError, "hidden: expected dtype"),
    ("weight D", _topk(item_weight=torch.randn(20, 9)), ValueError, "item_weight: expected D=8 columns"),
    ("weight dtype", _topk(item_weight=torch.randn(20, 8).half()), TypeError, "item_weight: expected dtype"),
    ("weight device", _topk(item_weight=torch.randn(20, 8, device="meta")), ValueError, "item_weight: expected a"),
    ("weight empty", _topk(item_weight=torch.randn(0, 8)), ValueError, "item_weight: expected at least one item"),
    ("k zero", _topk(k=0), ValueError, "k: expected an int >= 1, got 0"),
    ("k bool", _topk(k=True), TypeError, "k: expected an int, got bool"),
    ("k float", _topk(k=2.0), TypeError, "k: expected an int, got float"),
    ("exclude dtype", _topk(exclude=torch.ones(3, 2)), TypeError, "exclude: expected dtype"),
    ("exclude rank", _topk(exclude=torch.ones(3, dtype=torch.long)), ValueError, "exclude: expected 2 dimensions"),
    ("exclude rows", _topk(exclude=torch.ones(2, 4, dtype=torch.long)), ValueError, "exclude: expected 3 rows"),
    ("exclude range", _topk(exclude=torch.full((3, 2), 20)), ValueError, "exclude: expected item ids in [0, 20)"),
    ("exclude negative", _topk(exclude=torch.full((3, 2), -1)), ValueError, "exclude: expected item ids"),
    ("exclude_items range", _topk(exclude_items=(20,)), ValueError, "exclude_items: expected item ids in [0, 20)"),
    ("exclude_items type", _topk(exclude_items=0), TypeError, "exclude_items: expected a sequence"),
    ("exclude_items float", _topk(exclude_items=(1.0,)), ValueError, "exclude_items: expected item ids"),
    ("backend", _topk(backend="tpu"), ValueError, "backend: expected one of"),
    ("cpp", _topk(backend=CPP.values[0]), ValueError, "backend: 'cpp' has no topk_items"),
    ("triton k", _topk(k=2049, backend="triton"), ValueError, "k: expected k <= 2048 on backend 'triton'"),
    (
        "triton float64",
        _topk(hidden=torch.randn(3, 8).double(), item_weight=torch.randn(20, 8).double(), backend="triton"),
        TypeError,
        "hidden: the 'triton' backend takes",
    ),  # fmt: skip
    ("targets shape", _ranks(targets=torch.tensor([1, 2])), ValueError, "targets: expected 3 rows"),
    ("targets rank", _ranks(targets=torch.ones(3, 1, dtype=torch.long)), ValueError, "targets: expected 1 dim"),
    ("targets dtype", _ranks(targets=torch.ones(3)), TypeError, "targets: expected dtype"),
    ("targets range", _ranks(targets=torch.tensor([1, 2, 20])), ValueError, "targets: expected item ids in [0, 20)"),
    ("ranks exclude", _ranks(exclude=torch.full((3, 1), 99)), ValueError, "exclude: expected item ids in [0, 20)"),
    ("ranks cpp", _ranks(backend=CPP.values[0]), ValueError, "backend: 'cpp' has no target_ranks"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error) as raised:
        call()
    assert message in str(raised.value)


def test_the_ops_have_their_schemas_and_no_cpp_twin():
    assert sorted(FORWARD_SCHEMAS) == ["target_ranks", "topk_items"]
    for family, schema in FORWARD_SCHEMAS.items():
        for backend in BACKENDS:
            name = f"seqrec::{family}_{backend}"
            assert str(cpp_op(name)._schema) == str(torch._C.parse_schema(name + schema))
        assert not hasattr(torch.ops.seqrec, f"{family}_cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight = torch.randn(5, 16), torch.randn(40, 16)
    exclude = torch.randint(0, 40, (5, 3))
    excluded_ids = torch.tensor([0, 7], dtype=torch.int32)
    torch.library.opcheck(op("topk_items", backend).default, (hidden, weight, exclude, excluded_ids, 6))
    torch.library.opcheck(op("topk_items", backend).default, (hidden, weight, exclude[:, :0], excluded_ids[:0], 50))
    targets = torch.randint(0, 40, (5,))
    torch.library.opcheck(op("target_ranks", backend).default, (hidden, weight, targets, exclude, excluded_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    embedding = torch.nn.Embedding(40, 16)
    projection = torch.nn.Linear(16, 16)
    exclude, targets = torch.randint(0, 40, (5, 3)), torch.randint(1, 40, (5,))

    def serve(x):
        hidden = projection(x)
        scores, ids = topk_items(hidden, embedding.weight, 4, exclude=exclude, backend=backend)
        return scores, ids, target_ranks(hidden, embedding.weight, targets, exclude=exclude, backend=backend)

    x = torch.randn(5, 16)
    compiled = torch.compile(serve, fullgraph=True, backend="aot_eager")(x)
    eager = serve(x)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    assert not compiled[0].requires_grad  # inputs that require grad: no gradient to give


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_scores_the_cast_operands(backend):
    """Under torch.autocast the ops see 16-bit operands, as a linear layer would, and still
    return float32 scores."""
    hidden, weight = torch.randn(5, 16), torch.randn(40, 16)
    targets = torch.randint(0, 40, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, ids = topk_items(hidden, weight, 6, backend=backend)
        ranks = target_ranks(hidden, weight, targets, backend=backend)
    cast = hidden.bfloat16(), weight.bfloat16()
    expected_scores, expected_ids = topk_items(*cast, 6, backend=backend)
    assert scores.dtype == torch.float32 and torch.equal(scores, expected_scores) and torch.equal(ids, expected_ids)
    assert torch.equal(ranks, target_ranks(*cast, targets, backend=backend))


# ----------------------------------------------------------------------------- SASRec


GAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "games.txt"  # ../shared/data beside the checkout


@pytest.fixture(scope="module", params=["synthetic", "games"])
def trained(request):
    """A SASRec trained a little on the synthetic data or Games (where ../shared/data has
    it), and its leave-one-out split, 1,024 users evaluated."""
    if request.param == "games" and not GAMES.exists():
        pytest.skip(f"{GAMES} is absent")
    interactions = read_interactions(GAMES) if request.param == "games" else synthetic_interactions(num_users=700)
    split = LeaveOneOutSplit.of(SequenceDataset.from_interactions(interactions))
    split = dataclasses.replace(split, eval_users=split.eval_users[:1024])
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=split.data.num_items, max_len=20, hidden=32, dropout=0.2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for users in split.training_users().split(128)[:4]:
        inputs, targets = split.training_batch(users, 20)
        negatives = torch.randint(1, split.data.num_items + 1, (*targets.shape, 1))
        loss = model.loss(inputs, targets, (negatives, None))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), split


def test_sasrec_full_metrics_equal_the_score_matrix_path(trained):
    model, split = trained
    data, ranks = split.data, []
    for users in split.eval_users.split(256):  # what evaluate() computed before target_ranks
        histories, targets = split.evaluation_batch(users, model.config.max_len, "test")
        scores = model.score(PackedBatch.from_padded(histories, max_len=model.config.max_len)).float()
        target_scores = scores.gather(1, targets[:, None])
        ends = split.train_lengths[users] + 1
        scores = scores.scatter(1, data.windows(users, ends, int(ends.max())), -math.inf)
        scores[:, 0] = -math.inf
        ranks.append((scores > target_scores).sum(1))
    assert evaluate(model, split, "test", "full", batch_size=256) == ranking_metrics(torch.cat(ranks))


@pytest.mark.parametrize("packed", [False, True])
def test_sasrec_recommendations_equal_the_score_matrix_path(trained, packed):
    model, split = trained
    histories, _ = split.evaluation_batch(split.eval_users[:64], model.config.max_len, "test")
    batch = PackedBatch.from_padded(histories, max_len=model.config.max_len) if packed else histories
    scores = model.score(batch)  # what recommend() computed before topk_items
    scores[:, 0] = -math.inf
    scores.scatter_(1, histories, -math.inf)
    top = scores.topk(10, dim=1)
    ids, values = model.recommend(batch, k=10)
    assert torch.equal(ids, top.indices) and torch.equal(values, top.values)
