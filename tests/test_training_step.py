"""The training step in static shapes: token buckets, padding that costs nothing, the whole
step compiled (fullgraph, no host reads, one compilation per bucket) and the same numbers
as eager steps, batches prepared on a background thread, and CUDA graph replay (GPU)."""

import threading

import pytest
import torch
from host_reads import HostReadCounter
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from backends_under_test import ALL, GPU_CUDA, KERNELS
from seqrec_kernels import value_checks
from seqrec_kernels.data.dataset import LeaveOneOutSplit, SequenceDataset
from seqrec_kernels.data.packed import PackedBatch, token_buckets
from seqrec_kernels.data.readers import Interactions
from seqrec_kernels.data.synthetic import synthetic_interactions
from seqrec_kernels.models import SASRec, SASRecConfig
from seqrec_kernels.models.sasrec import negative_sampler
from seqrec_kernels.train import (
    TrainConfig,
    TrainingBatches,
    epoch_users,
    prefetched,
    step_loss_function,
    train,
)
from seqrec_kernels.training_step import CapturedSteps, TrainingStep, make_optimizer, whole_step_compilable

LOSSES = ["bce", "gbce", "sampled_softmax", "full_softmax"]
BATCH = 24


def run(loss="bce", batching="packed", users=150, seed=0, **train_options):
    """(split, model config, TrainingBatches) of a small synthetic run: lengths 3..~25, so that
    batches spread over the buckets."""
    data = SequenceDataset.from_interactions(
        synthetic_interactions(num_users=users, num_items=60, mean_length=9.0, seed=seed)
    )
    split = LeaveOneOutSplit.of(data)
    model = SASRecConfig(num_items=60, max_len=12, hidden=16, blocks=2, dropout=0.0, loss=loss, num_negatives=5)
    config = TrainConfig(batch_size=BATCH, batching=batching, seed=seed, **train_options)
    sampler = negative_sampler(model, data, split.train_item_counts())
    return split, model, TrainingBatches.of(config, split, model, sampler)


def test_token_buckets_are_few_and_hold_every_batch():
    split, model, batches = run(users=300)
    counts = batches.token_counts
    assert 1 < len(counts) <= 4 and list(counts) == sorted(set(counts)) and all(c % 8 == 0 for c in counts)
    tokens = (split.train_lengths[split.training_users()] - 1).clamp(max=model.max_len)
    assert counts[-1] >= int(tokens.topk(BATCH).values.sum())  # the longest histories together fit
    users = split.training_users()
    used = set()
    for epoch in range(1, 6):
        for batch_users in epoch_users(users, BATCH, seed=0, epoch=epoch):
            items = batches(batch_users)[0]
            real = int((items != 0).sum())
            assert items.numel() in counts and real <= items.numel()
            assert items.numel() == min(c for c in counts if c >= real)  # the smallest that fits
            used.add(items.numel())
    assert len(used) >= 2  # the buckets are quantiles of the batches, not all the largest
    assert token_buckets(tokens, BATCH, count=1) == (counts[-1],)
    with pytest.raises(ValueError, match="count: expected an int >= 1"):
        token_buckets(tokens, BATCH, count=0)
    with pytest.raises(ValueError, match=r"token_counts: expected a count >= the batch's 7 tokens"):
        PackedBatch.from_padded(torch.ones(1, 7, dtype=torch.long), token_counts=[4, 6])


def step_loss(model, batching, inputs):
    return step_loss_function(model, model, batching)(inputs)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ALL)
def test_padding_costs_nothing(loss, backend):
    """A batch padded to the static shapes (a short last batch's empty rows, a tail of padding
    tokens, whatever negatives those draw) has the loss and gradients of its real tokens alone."""
    split, config, batches = run(loss)
    torch.manual_seed(1)
    model = SASRec(config).set_backend(backend)
    batch_users = split.training_users()[: BATCH - 5]  # a short batch: 5 empty rows
    padded = batches(batch_users, torch.Generator().manual_seed(2))
    real = int(padded[2][-1])  # cu_seqlens[-1]
    assert padded[0].numel() > real and padded[2].numel() == BATCH + 1
    # The same batch without padding: the real tokens, the real rows, their negatives.
    exact = [padded[0][:real], padded[1][:real], padded[2][: BATCH - 4], padded[3][:real], padded[4][:real]]
    if loss in ("bce", "gbce"):
        exact += [t[:real] for t in padded[5:]]
        padded[5][real:] = torch.randint(1, 61, padded[5][real:].shape)  # any negatives on the tail
    else:
        exact += padded[5:]
    results = []
    for inputs in (exact, padded):
        model.zero_grad()
        value = step_loss(model, "packed", inputs)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def reading_ops(graphs) -> list[str]:
    """The ops of traced aten graphs that read tensor values on the host (or whose output
    shape depends on them), by HostReadCounter's rules: the tags of data-dependent ops, and
    indexing only through a bool mask."""
    tags = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
    aten = torch.ops.aten
    index_ops = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

    def reads(node):
        if node.target in index_ops:
            indices = [i for i in node.args[1] if i is not None]
            return any(i.meta["val"].dtype in (torch.bool, torch.uint8) for i in indices)
        return any(tag in node.target.tags for tag in tags) or node.target is aten._local_scalar_dense.default

    return [
        str(node.target)
        for graph in graphs
        for node in graph.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and reads(node)
    ]


def recording_backend(graphs: list):
    """aot_eager that keeps the aten graphs it runs."""

    def keep(graph, example_inputs):
        graphs.append(graph)
        return graph

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


@pytest.mark.skipif(not whole_step_compilable(), reason="this torch's Dynamo cannot trace Tensor.backward()")
@pytest.mark.parametrize("loss", LOSSES)
def test_compiled_whole_step_is_the_eager_step(loss):
    """An epoch of varied batches (every bucket, the short last batch): the whole step
    compiled with fullgraph has no graph break, compiles once per token count, reads no
    device value, and gives the eager steps' losses and parameters."""
    split, config, batches = run(loss, users=400)
    users = split.training_users()
    epoch = [batches(u, torch.Generator().manual_seed(i)) for i, u in enumerate(epoch_users(users, BATCH, 0, 1))]
    shapes = {inputs[0].numel() for inputs in epoch}
    assert len(shapes) >= 3 and epoch[-1][2].numel() == BATCH + 1  # the short last batch keeps B + 1 offsets
    results, graphs = [], []
    torch._dynamo.reset()
    counters.clear()
    for compile in (False, recording_backend(graphs)):
        torch.manual_seed(0)
        model = SASRec(config).set_backend("auto")
        step = TrainingStep(step_loss_function(model, model, "packed"), make_optimizer(model.parameters(), 1e-2, 0.0,
                            torch.device("cpu")), compile=compile)  # fmt: skip
        with value_checks(False):
            losses = torch.stack([step(inputs) for inputs in epoch])
        results.append((losses, dict(model.named_parameters())))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == len(shapes)  # at most the buckets: one per shape seen
    assert graphs and reading_ops(graphs) == []
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert_same_parameters(results[0][1], results[1][1], steps=len(epoch), lr=1e-2, rtol=1e-4, atol=1e-5)


def assert_same_parameters(a: dict, b: dict, steps: int, lr: float, **tolerance):
    """The parameters of two runs agree; the key biases within Adam's step size: their true
    gradient is zero (softmax ignores a shift of every score), so Adam steps them by the sign
    of rounding noise, which differs between two correct runs."""
    for name, p in a.items():
        if name.endswith("attention.key.bias"):
            assert (p - b[name]).abs().max() <= 2 * lr * steps, name
        else:
            torch.testing.assert_close(p, b[name], **tolerance, msg=name)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batching", ["packed", "padded"])
@pytest.mark.parametrize("backend", KERNELS)
def test_eager_step_reads_no_device_values(loss, batching, backend):
    """The step the GPU runs eagerly, on CPU tensors standing in for device ones: no host read
    of a value (the CPU step counts of torch's non-capturable Adam are host tensors). The
    GPU backends only: the reference reads (packed lengths; full_softmax's nonzero) on the host."""
    split, config, batches = run(loss, batching)
    model = SASRec(config).set_backend(backend)
    step = TrainingStep(step_loss_function(model, model, batching), make_optimizer(model.parameters(), 1e-3, 0.0,
                        torch.device("cpu")))  # fmt: skip
    with value_checks(False):
        for batch_users in epoch_users(split.training_users(), BATCH, 0, 1)[-2:]:  # the last is short
            inputs = batches(batch_users)
            with HostReadCounter(step.host_step_counts) as counter:
                step(inputs)
            assert counter.reads == [], sorted(set(counter.reads))


def test_training_compiled_with_aot_eager(tmp_path):
    """`seqrec train --compile aot_eager` end to end: no graph break, at most one compilation
    per token bucket over two epochs, and it learns."""
    sequences = synthetic_interactions(num_users=200, num_items=50, mean_length=10.0, seed=3)
    (tmp_path / "data.txt").write_text("".join(f"{u} {i}\n" for u, s in enumerate(sequences.sequences) for i in s))
    torch._dynamo.reset()
    counters.clear()
    config = TrainConfig.from_dict(dict(
        data=str(tmp_path / "data.txt"), epochs=2, eval_every=2, hidden=16, blocks=1, batch_size=32, dropout=0.2,
        out=str(tmp_path / "run"), progress=False, device="cpu", compile="aot_eager", token_buckets=3,
    ))  # fmt: skip
    report = train(config)
    assert dict(counters["graph_break"]) == {}
    if whole_step_compilable():
        assert 1 <= counters["stats"]["unique_graphs"] <= 3
    assert report["sampled"]["NDCG@10"] > 0.1


def test_prefetched_keeps_order_raises_where_it_fails_and_stops_early():
    made = []

    def make(i):
        made.append(threading.current_thread().name)
        if i == 5:
            raise KeyboardInterrupt
        return i * i

    results = []
    with pytest.raises(KeyboardInterrupt):
        for value in prefetched(make, range(10)):
            results.append(value)
    assert results == [0, 1, 4, 9, 16] and set(made) == {"seqrec-batches"}
    stream = prefetched(lambda i: i, range(1000), depth=2)
    assert next(stream) == 0
    stream.close()  # leaving early: the producer stops instead of building the rest
    assert not any(t.name == "seqrec-batches" for t in threading.enumerate())


def test_config_rejects_fp16_compile_and_bad_buckets():
    with pytest.raises(ValueError, match="amp: fp16's GradScaler reads its inf check"):
        TrainConfig(amp="fp16", compile=True)
    with pytest.raises(ValueError, match="token_buckets: expected an int >= 1"):
        TrainConfig(token_buckets=0)
    with pytest.raises(ValueError, match="weight_decay: expected a value >= 0"):
        TrainConfig(weight_decay=-1.0)
    assert TrainConfig.from_dict(dict(token_bucket=128)).token_buckets == 4  # an older checkpoint's option
    with pytest.raises(ValueError, match="graph: CUDA graphs need CUDA parameters"):
        model = SASRec(SASRecConfig(num_items=5))
        TrainingStep(lambda inputs: None, make_optimizer(model.parameters(), 1e-3, 0.0, torch.device("cpu")),
                     graph=True)  # fmt: skip


def test_adamw_decays_weights_decoupled():
    """weight_decay > 0 makes the step AdamW's: p -= lr * wd * p besides the Adam update."""
    data = Interactions([[1, 2, 3, 4, 5]], num_items=5, source="t")
    split = LeaveOneOutSplit.of(SequenceDataset.from_interactions(data))
    config = SASRecConfig(num_items=5, max_len=4, hidden=8, dropout=0.0, loss="full_softmax")
    stepped = []
    for weight_decay in (0.0, 0.5):
        torch.manual_seed(0)
        model = SASRec(config)
        optimizer = make_optimizer(model.parameters(), 0.1, weight_decay, torch.device("cpu"))
        assert isinstance(optimizer, torch.optim.AdamW) == (weight_decay > 0)
        start = model.final_norm.weight.detach().clone()
        inputs = TrainingBatches(split, config, "packed", 1, None, (8,))(split.training_users())
        TrainingStep(step_loss_function(model, model, "packed"), optimizer)(inputs)
        stepped.append((start, model.final_norm.weight.detach().clone()))
    (start, plain), (_, decayed) = stepped
    torch.testing.assert_close(decayed, plain - 0.1 * 0.5 * start)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_step_updates_as_the_optimizers_own_step(weight_decay):
    """TrainingStep's update (torch's functional Adam on the optimizer's state) is bitwise what
    optimizer.step() gives, step after step (moments, bias corrections, decoupled decay)."""
    split, config, batches = run("bce")
    config = SASRecConfig(**{**vars(config), "dropout": 0.3})
    torch.manual_seed(3)
    ours, theirs = SASRec(config), SASRec(config)
    theirs.load_state_dict(ours.state_dict())
    ours_optimizer = make_optimizer(ours.parameters(), 3e-3, weight_decay, torch.device("cpu"))
    theirs_optimizer = make_optimizer(theirs.parameters(), 3e-3, weight_decay, torch.device("cpu"))
    step = TrainingStep(step_loss_function(ours, ours, "packed"), ours_optimizer)
    theirs_loss = step_loss_function(theirs, theirs, "packed")
    users = split.training_users()
    for i in range(6):
        inputs = batches(users[i * 7 : i * 7 + BATCH], torch.Generator().manual_seed(i))
        torch.manual_seed(10 + i)  # the same dropout masks
        step(inputs)
        torch.manual_seed(10 + i)
        theirs_optimizer.zero_grad()
        theirs_loss(inputs).backward()
        theirs_optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours_optimizer.state.values(), theirs_optimizer.state.values(), strict=True):
        assert all(torch.equal(a[name], b[name]) for name in ("step", "exp_avg", "exp_avg_sq"))


# ----------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton", GPU_CUDA])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("loss", ["bce", "full_softmax"])
def test_gpu_replayed_steps_match_eager_steps(backend, amp, loss):
    """Steps replayed from CUDA graphs (after the warm-up and capture of each token count)
    give the eager steps' losses and parameters, on the same pinned batches."""
    split, config, batches = run(loss, users=300)
    batches.pin = True
    users = split.training_users()
    epoch = [batches(u, torch.Generator().manual_seed(i)) for i, u in enumerate(epoch_users(users, BATCH, 0, 1))]
    epoch = epoch + epoch  # every shape replayed several times
    results = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = SASRec(config).cuda().set_backend(backend)
        optimizer = make_optimizer(model.parameters(), 1e-2, 0.0, torch.device("cuda"))
        step = TrainingStep(step_loss_function(model, model, "packed"), optimizer, amp, graph=graph)
        with value_checks(False):
            losses = torch.stack([step(inputs).clone() for inputs in epoch])
        if graph:
            captured: CapturedSteps = step._run
            assert 2 <= len(captured.graphs) <= len(batches.token_counts)  # replays interleave graphs
        results.append((losses.cpu(), {name: p.detach().cpu() for name, p in model.named_parameters()}))
    tolerance = dict(rtol=1e-4, atol=1e-5) if amp is None else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(results[0][0], results[1][0], **tolerance)
    assert_same_parameters(results[0][1], results[1][1], steps=len(epoch), lr=1e-2, **tolerance)


@pytest.mark.gpu
def test_gpu_training_replays_cuda_graphs(tmp_path):
    """`seqrec train` on CUDA: graph replay by default, dropout on, learns."""
    config = TrainConfig.from_dict(dict(epochs=3, eval_every=3, hidden=32, dropout=0.2, out=str(tmp_path / "run"),
                                        progress=False, device="cuda", amp="bf16"))  # fmt: skip
    report = train(config)
    assert report["sampled"]["NDCG@10"] > 0.2
