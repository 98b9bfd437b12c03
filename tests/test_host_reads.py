"""The host-read detector's own controls: each kind of read is caught (a detector that
misses one would pass a training step that syncs), and ordinary device work is not."""

import pytest
import torch
import torch.nn.functional as F
from host_reads import HostReadCounter

READS = {
    "item": lambda x, m: x.sum().item(),
    "bool": lambda x, m: bool(x.sum() > 0),
    "int": lambda x, m: int(x[0, 0]),
    "float": lambda x, m: float(x[0, 0]),
    "if tensor": lambda x, m: 1 if m.any() else 0,
    "tolist": lambda x, m: x.tolist(),
    "numpy": lambda x, m: x.numpy(),
    "cpu": lambda x, m: x.cpu(),
    "to cpu": lambda x, m: x.to("cpu"),
    "to cpu device": lambda x, m: x.to(torch.device("cpu"), torch.float64),
    "to device=cpu": lambda x, m: x.to(device="cpu"),
    "nonzero": lambda x, m: m.nonzero(),
    "argwhere": lambda x, m: torch.argwhere(m),
    "where(cond)": lambda x, m: torch.where(m),
    "bool mask index": lambda x, m: x[m],
    "bool mask setitem": lambda x, m: x.clone().__setitem__(m, 0.0),
    "masked_select": lambda x, m: x.masked_select(m),
    "repeat_interleave(tensor)": lambda x, m: x.repeat_interleave(m[0].long(), dim=1),
    "bincount": lambda x, m: torch.bincount(m.flatten().long()),
    "unique": lambda x, m: torch.unique(x),
    "unique_consecutive": lambda x, m: torch.unique_consecutive(x),
    "equal": lambda x, m: torch.equal(x, x + 1),
    "allclose": lambda x, m: torch.allclose(x, x + 1),
    "one_hot without num_classes": lambda x, m: F.one_hot(m.long()),
}

NOT_READS = {
    "arithmetic": lambda x, m: (x * 2 + 1).softmax(-1).sum(),
    "integer index": lambda x, m: x[torch.tensor([0, 2])],
    "masked_fill": lambda x, m: x.masked_fill(m, 0.0),
    "where(cond, a, b)": lambda x, m: torch.where(m, x, 0.0),
    "dtype cast": lambda x, m: x.to(torch.float64),
    "repeat_interleave(tensor, output_size)": lambda x, m: x.repeat_interleave(
        torch.ones(5, dtype=torch.long), dim=1, output_size=5
    ),
    "topk": lambda x, m: x.topk(2, dim=-1),
    "shape": lambda x, m: x.shape[0] * x.numel(),
}


def inputs():
    x = torch.randn(3, 5)
    return x, x > 0


@pytest.mark.parametrize("name", READS)
def test_every_kind_of_read_is_caught(name):
    x, m = inputs()
    with HostReadCounter() as counter:
        READS[name](x, m)
    assert counter.reads, f"{name} was not seen"


@pytest.mark.parametrize("name", NOT_READS)
def test_device_work_is_not_a_read(name):
    x, m = inputs()
    with HostReadCounter() as counter:
        NOT_READS[name](x, m)
    assert counter.reads == []


@torch.library.custom_op("host_reads_test::masked_mean", mutates_args=())
def masked_mean(x: torch.Tensor) -> torch.Tensor:
    return x[x > 0].mean().reshape(1)  # a bool-mask index inside an op's implementation


@torch.library.custom_op("host_reads_test::scaled", mutates_args=())
def scaled(x: torch.Tensor) -> torch.Tensor:
    return x * int(x.abs().argmax())  # a scalar read inside an op's implementation


class ReadInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.sum())


def test_reads_inside_custom_ops_and_backward_are_caught():
    x, _ = inputs()
    for fn in (masked_mean, scaled):
        with HostReadCounter() as counter:
            fn(x)
        assert counter.reads, fn
    leaf = x.clone().requires_grad_()
    with HostReadCounter() as counter:
        ReadInBackward.apply(leaf).sum().backward()
    assert counter.reads == ["_local_scalar_dense"]


def test_host_tensors_are_exempt_and_methods_restored():
    step, x = torch.tensor(3.0), torch.randn(4)
    methods = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}
    with HostReadCounter(lambda: [step]) as counter:
        step.item()
        step.tolist()
        x.tolist()
    assert counter.reads == ["tolist"]
    assert all(getattr(torch.Tensor, name) is method for name, method in methods.items())
