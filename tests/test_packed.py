"""Packed (real-token) SASRec: the batch layout, the same function as the padded model on
every backend, training steps, and no host sync in the training loop."""

import copy

import pytest
import torch
from host_reads import HostReadCounter

import seqrec_kernels.train as train_module
from backends_under_test import ALL, CPP, GPU_CUDA
from seqrec_kernels.data.packed import PackedBatch
from seqrec_kernels.models import SASRec, SASRecConfig
from seqrec_kernels.models.sasrec import Layout, SelfAttention, negative_sampler, sample_negatives
from seqrec_kernels.train import TrainConfig, train

LOSSES = ["bce", "gbce", "sampled_softmax", "full_softmax"]


def test_from_padded_by_hand():
    histories = torch.tensor([[0, 0, 7, 8], [0, 0, 0, 0], [5, 6, 2, 9], [0, 0, 0, 3]])
    targets = torch.tensor([[0, 0, 8, 1], [0, 0, 0, 0], [6, 2, 9, 4], [0, 0, 0, 2]])
    batch = PackedBatch.from_padded(histories, targets, max_len=6, bucket=4)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 2, 2, 6, 7]
    assert batch.items.tolist() == [7, 8, 5, 6, 2, 9, 3, 0]  # 7 real tokens, a tail of 1 to T = 8
    assert batch.targets.tolist() == [8, 1, 6, 2, 9, 4, 2, 0]
    assert batch.positions.tolist() == [4, 5, 2, 3, 4, 5, 5, 0]  # column + max_len - L: the newest is 5
    assert batch.rows.tolist() == [0, 0, 2, 2, 2, 2, 3, 0]
    assert batch.last_tokens().tolist() == [1, 1, 5, 6]  # row 1 is empty: its "last" precedes its start
    assert (batch.num_sequences, batch.num_tokens) == (4, 8)


@pytest.mark.parametrize("bucket", [1, 3, 64])
def test_token_count_rounds_up_to_the_bucket(bucket):
    histories = torch.randint(1, 9, (5, 7)) * (torch.rand(5, 7) < 0.6)
    real = int((histories != 0).sum())
    batch = PackedBatch.from_padded(histories, bucket=bucket)
    assert batch.num_tokens % bucket == 0 and real <= batch.num_tokens < real + bucket + (real == 0)
    assert int(batch.cu_seqlens[-1]) == real and (batch.items[real:] == 0).all()
    empty = PackedBatch.from_padded(torch.zeros(3, 4, dtype=torch.long))  # T >= 1 even without tokens
    assert empty.num_tokens == 1 and empty.cu_seqlens.tolist() == [0, 0, 0, 0]


def test_from_padded_rejects_bad_input():
    with pytest.raises(ValueError, match="histories: expected \\[B, L\\]"):
        PackedBatch.from_padded(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets: expected the shape of histories"):
        PackedBatch.from_padded(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="bucket: expected an int >= 1"):
        PackedBatch.from_padded(torch.ones(2, 4, dtype=torch.long), bucket=0)
    with pytest.raises(ValueError, match="histories: expected at most max_len=3"):
        PackedBatch.from_padded(torch.ones(2, 4, dtype=torch.long), max_len=3)


def model(backend="reference", **overrides):
    config = dict(num_items=60, max_len=13, hidden=24, blocks=2, heads=2, dropout=0.3)
    config.update(overrides)
    return SASRec(SASRecConfig(**config)).set_backend(backend)


def histories(batch=6, length=13):
    """Left-padded histories of random lengths, one of them full and one empty."""
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[0], lengths[1] = length, 0
    items = torch.randint(1, 61, (batch, length))
    return torch.where(torch.arange(length) >= length - lengths[:, None], items, 0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("norm_first", [False, True])
def test_packed_and_padded_agree_in_eval_mode(backend, norm_first):
    torch.manual_seed(torch.seed() % 2**31)
    m = model(backend, norm_first=norm_first).eval()
    h = histories(length=11)  # shorter than max_len: positions max_len - 11 ..
    batch = PackedBatch.from_padded(h, max_len=13, bucket=8)
    real = h != 0
    padded, packed = m(h), m(batch)
    torch.testing.assert_close(packed[: real.sum()], padded[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.score(batch), m.score(h), atol=1e-5, rtol=1e-5)
    candidates = torch.randint(1, 61, (h.shape[0], 5))
    torch.testing.assert_close(m.score(batch, candidates), m.score(h, candidates), atol=1e-5, rtol=1e-5)
    ids, _ = m.recommend(batch, k=7)
    assert torch.equal(ids, m.recommend(h, k=7)[0])
    for row in range(h.shape[0]):
        assert not set(ids[row].tolist()) & set(h[row].tolist())


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", ALL)
def test_packed_loss_and_gradients_equal_the_padded_ones(loss, backend):
    """Without dropout and with the same negatives, a packed step is the padded step."""
    padded_model = model(backend, loss=loss, num_negatives=5, dropout=0.0)
    packed_model = copy.deepcopy(padded_model)
    h = histories()
    targets = torch.where(h != 0, torch.randint(1, 61, h.shape), 0)
    batch = PackedBatch.from_padded(h, targets, max_len=13, bucket=16)
    sampler = negative_sampler(padded_model.config, item_counts=torch.randint(1, 9, (61,)))
    users = torch.arange(h.shape[0])
    negatives = sample_negatives(padded_model.config, sampler, h.shape, users=users)
    packed_negatives = negatives
    if loss in ("bce", "gbce"):  # the padded rows' negatives, then any on the tail
        tail = batch.num_tokens - int((h != 0).sum())
        packed_negatives = tuple(torch.cat([t[h != 0], t[0, :1].expand(tail, -1)]) for t in negatives)
    results = []
    for m, args in ((padded_model, (h, targets, negatives)), (packed_model, (batch, None, packed_negatives))):
        value = m.loss(*args)
        value.backward()
        results.append((value, [p.grad for p in m.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ALL)
def test_attention_dropout_mask_is_the_padded_one(backend):
    """The dropout hash is keyed by sequence, head and position: packed and padded draw
    the same mask from the same seed."""
    attention = SelfAttention(hidden=12, heads=3, dropout=0.4).train()
    h = histories(batch=5, length=9)
    real = h != 0
    x = torch.randn(*h.shape, 12) * real[..., None]
    batch = PackedBatch.from_padded(h, bucket=4)
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    padded = attention(x, x, Layout(seq_lens=real.sum(1)), backend)
    torch.manual_seed(seed)
    tokens = torch.cat([x[real], torch.zeros(batch.num_tokens - int(real.sum()), 12)])  # [T, 12]
    packed = attention(tokens, tokens, Layout(cu_seqlens=batch.cu_seqlens, max_seqlen=9), backend)
    torch.testing.assert_close(packed[: real.sum()], padded[real], atol=1e-5, rtol=1e-5)
    assert (packed[real.sum() :] == 0).all()  # the tail attends to nothing


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", [CPP])
def test_training_steps_never_read_device_values(tmp_path, monkeypatch, loss, backend):
    """Every step of an epoch runs without a host read of device values (item(), bool(),
    tolist(), nonzero, mask indexing, ...): on a GPU the loop never waits; the epoch's loss
    is read once. The CPU tensors stand in for device tensors (HostReadCounter). A whole
    epoch on `cpp`; tests/test_training_step.py checks single steps on every kernel backend
    (Triton's interpreter is too slow for an epoch; the reference reads on the host)."""
    steps, reads = [], []
    real_step = train_module.training_step

    def counted_step(step, inputs):
        with HostReadCounter(step.host_step_counts) as counter:  # torch.optim's step counts live on the host
            steps.append(real_step(step, inputs))
        reads.extend(counter.reads)
        return steps[-1]

    monkeypatch.setattr(train_module, "training_step", counted_step)
    config = TrainConfig.from_dict(dict(
        epochs=1, eval_every=5, hidden=16, blocks=1, loss=loss, num_negatives=8, batch_size=256, progress=False,
        device="cpu", backend=backend, out=str(tmp_path / "run"),
    ))  # fmt: skip
    train(config)
    assert len(steps) >= 7 and reads == [], sorted(set(reads))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", GPU_CUDA])
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_gpu_training_steps_never_sync(tmp_path, monkeypatch, backend, amp):
    """Every training step of an epoch on a GPU under torch.cuda.set_sync_debug_mode("error"):
    any sync inside a step (an item(), a copy to the host, nonzero, ...) raises."""
    steps = []
    real_step = train_module.training_step

    def checked_step(step, inputs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps.append(real_step(step, inputs))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return steps[-1]

    monkeypatch.setattr(train_module, "training_step", checked_step)
    for loss in LOSSES:
        config = TrainConfig.from_dict(dict(
            epochs=1, eval_every=5, hidden=32, blocks=2, loss=loss, num_negatives=8, batch_size=256, progress=False,
            device="cuda", backend=backend, amp=amp, out=str(tmp_path / loss),
        ))  # fmt: skip
        train(config)
    assert len(steps) >= 4 * 7


def test_packed_and_padded_training_both_learn(tmp_path):
    reports = {
        batching: train(
            TrainConfig.from_dict(
                dict(
                    epochs=3,
                    eval_every=3,
                    hidden=32,
                    dropout=0.2,
                    batching=batching,
                    progress=False,
                    device="cpu",
                    out=str(tmp_path / batching),
                )
            )
        )  # fmt: skip
        for batching in ("packed", "padded")
    }
    for report in reports.values():
        assert report["sampled"]["NDCG@10"] > 0.2, reports
    with pytest.raises(ValueError, match="batching: expected one of packed, padded"):
        TrainConfig(batching="jagged")
    with pytest.raises(ValueError, match="token_buckets: expected an int >= 1"):
        TrainConfig(token_buckets=0)
