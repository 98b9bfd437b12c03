"""Readers, the leave-one-out split, batching and negative sampling."""

import math

import pytest
import torch

from seqrec_kernels.data.dataset import InsufficientDataError, LeaveOneOutSplit, SequenceDataset
from seqrec_kernels.data.readers import DataFormatError, Interactions, read_interactions
from seqrec_kernels.data.samplers import UnseenSampler
from seqrec_kernels.data.synthetic import synthetic_interactions


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sasrec_format_keeps_file_order_and_reindexes_from_one(tmp_path):
    path = write(tmp_path, "a.txt", "7 100\n7 50\n3 50\n7 100\n3 9\n")
    data = read_interactions(path)
    assert data.sequences == [[1, 2, 1], [2, 3]] and data.num_items == 3


def test_sequences_format(tmp_path):
    data = read_interactions(write(tmp_path, "s.txt", "5 6 7\n\n7 5\n"), format="sequences")
    assert data.sequences == [[1, 2, 3], [3, 1]]


def test_inter_and_csv_sort_by_time(tmp_path):
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu\ta\t5\t30\nu\tb\t3\t10\nv\ta\t1\t5\n"
    assert read_interactions(write(tmp_path, "x.inter", inter)).sequences == [[1, 2], [2]]
    csv = "user,item,timestamp\nu,a,30\nu,b,10\nv,a,5,4.0\n"
    assert read_interactions(write(tmp_path, "x.csv", csv)).sequences == [[1, 2], [2]]


@pytest.mark.parametrize(
    "name, text, line",
    [
        ("bad.txt", "1 2\n1 2 3\n", 2),
        ("bad.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\n", 2),
        ("bad.inter", "user_id:token\titem_id:token\tstamp:float\nu\ta\t1\n", 1),
        ("bad.csv", "u,a,1\nu,a,yesterday\n", 2),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, name, text, line):
    path = write(tmp_path, name, text)
    with pytest.raises(DataFormatError, match=f"{name}:{line}:"):
        read_interactions(path)


@pytest.mark.parametrize(
    "name, data, line",
    [
        ("latin1.txt", "1 a\n1 b\n2 caf\xe9\n".encode("latin-1"), 3),  # guessing the format reads line 1 only
        ("first.txt", b"\xff\xfe1 2\n", 1),
        ("seq.txt", b"1 2 3\n4 \xff\n", 2),
        ("x.inter", b"user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\t\xff\t2\n", 3),
        ("x.csv", b"user,item,timestamp\nu,\xe9,1\n", 2),
    ],
)
def test_non_utf8_files_name_file_and_line(tmp_path, name, data, line):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataFormatError, match=f"{name}:{line}: not UTF-8 text"):
        read_interactions(path, format="sequences" if name == "seq.txt" else None)


@pytest.mark.parametrize("name", ["a.txt", "a.inter", "a.csv"])
def test_windows_line_ends_read_as_unix_ones(tmp_path, name):
    text = {
        "a.txt": "7 100\n7 50\n3 50\n",
        # the item last and no final line end: a kept "\r" would make "50\r" and "50" two items
        "a.inter": "user_id:token\ttimestamp:float\titem_id:token\n7\t1\t100\n7\t2\t50\n3\t3\t50",
        "a.csv": "user,item,timestamp\n7,100,1\n7,50,2\n3,50,3\n",
    }[name]
    unix = read_interactions(write(tmp_path, name, text))
    (tmp_path / name).write_bytes(text.replace("\n", "\r\n").encode())
    assert read_interactions(tmp_path / name).sequences == unix.sequences == [[1, 2], [2]]


def test_missing_file_and_k_core(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_interactions(tmp_path / "nope.txt")
    text = "".join(f"{u} {i}\n" for u, items in {1: [1, 2, 3], 2: [1, 2, 4], 3: [1, 5]}.items() for i in items)
    kept = read_interactions(write(tmp_path, "k.txt", text), min_count=2)
    assert kept.sequences == [[1, 2], [1, 2]]  # items 3, 4, 5 and then user 3 drop out


def test_synthetic_is_deterministic_and_learnable():
    first, again = synthetic_interactions(seed=3), synthetic_interactions(seed=3)
    assert first.sequences == again.sequences
    assert synthetic_interactions(seed=4).sequences != first.sequences
    assert min(map(len, first.sequences)) >= 3
    assert all(1 <= i <= first.num_items for s in first.sequences for i in s)


def small_split():
    data = Interactions([[1, 2, 3, 4, 5], [6, 7], [8, 9, 1]], num_items=9, source="test")
    return LeaveOneOutSplit.of(SequenceDataset.from_interactions(data))


def test_leave_one_out_split_and_windows():
    split = small_split()
    assert split.train_lengths.tolist() == [3, 2, 1]  # user 1 has < 3 items: train only
    assert split.eval_users.tolist() == [0, 2]
    assert split.training_users().tolist() == [0, 1]
    inputs, targets = split.training_batch(torch.tensor([0, 1]), max_len=4)
    assert inputs.tolist() == [[0, 0, 1, 2], [0, 0, 0, 6]]
    assert targets.tolist() == [[0, 0, 2, 3], [0, 0, 0, 7]]  # no target after padding
    histories, targets = split.evaluation_batch(torch.tensor([0, 2]), max_len=3, stage="valid")
    assert histories.tolist() == [[1, 2, 3], [0, 0, 8]] and targets.tolist() == [4, 9]
    histories, targets = split.evaluation_batch(torch.tensor([0, 2]), max_len=3, stage="test")
    assert histories.tolist() == [[2, 3, 4], [0, 8, 9]] and targets.tolist() == [5, 1]
    assert split.train_item_counts().tolist() == [0, 1, 1, 1, 0, 0, 1, 1, 1, 0]


def test_split_rejects_data_without_evaluable_users():
    data = SequenceDataset.from_interactions(Interactions([[1, 2], [3]], num_items=3, source="t"))
    with pytest.raises(InsufficientDataError, match="got 2 users, longest history 2"):
        LeaveOneOutSplit.of(data)


def test_sample_unseen_never_returns_the_users_items():
    data = SequenceDataset.from_interactions(synthetic_interactions(num_users=50, num_items=40, seed=1))
    users = torch.arange(50)
    negatives = data.sample_unseen(users, (7, 30))
    assert negatives.shape == (50, 7, 30) and negatives.min() >= 1 and negatives.max() <= 40
    for user in range(50):
        history = set(data.items[data.offsets[user] : data.offsets[user + 1]].tolist())
        assert not history & set(negatives[user].reshape(-1).tolist())


def test_unseen_sampler_draws_per_user_with_its_probability():
    data = SequenceDataset.from_interactions(synthetic_interactions(num_users=30, num_items=40, seed=2))
    sampler = UnseenSampler(data)
    users = torch.randint(0, 30, (12,))
    ids, log_q = sampler((12, 5, 3), users=users)
    assert ids.shape == log_q.shape == (12, 5, 3) and ids.min() >= 1 and ids.max() <= 40
    for row, user in enumerate(users.tolist()):
        history = set(data.items[data.offsets[user] : data.offsets[user + 1]].tolist())
        assert not history & set(ids[row].reshape(-1).tolist())
        assert torch.allclose(log_q[row], torch.tensor(-math.log(40 - len(history))))
    with pytest.raises(ValueError, match="users: the unseen sampler draws per user"):
        sampler((12, 5))
    with pytest.raises(ValueError, match="users: the unseen sampler draws per user"):
        sampler((11, 5), users=users)
