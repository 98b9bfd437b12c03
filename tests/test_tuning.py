"""The launchers read the per-GPU tuning table (seqrec_kernels.tuning): on the GPU a table
names, its measured configuration is launched; on any other GPU, or for keys it does not
list, today's defaults. On CPU the GPU's name is faked and the kernels run in Triton's
interpreter, so the configuration that reaches the launch is observed directly."""

import json

import pytest
import torch

import seqrec_kernels as sk
from seqrec_kernels import tuning
from seqrec_kernels.backends import triton_interpreter_enabled
from seqrec_kernels.triton import attention as triton_attention

pytestmark = pytest.mark.skipif(not triton_interpreter_enabled(), reason="observes launches in Triton's interpreter")

FAKE_GPU = "Fake GPU 9000 (80GB)"


@pytest.fixture
def launches(monkeypatch):
    """{kernel name: [the launch's keyword arguments, ...]} of every Triton launch."""
    seen = {}
    kernel_class = type(triton_attention._attention_fwd_kernel)
    launch = kernel_class.run

    def recorded(kernel, *args, **kwargs):
        seen.setdefault(kernel.fn.__name__, []).append(kwargs)
        return launch(kernel, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", recorded)
    return seen


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """Every device looks like FAKE_GPU; tables are read from tmp_path. Returns a writer."""
    monkeypatch.setattr(tuning, "device_name", lambda device: FAKE_GPU)
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    tuning.clear_caches()
    yield lambda entries: (tmp_path / f"{tuning.gpu_slug(FAKE_GPU)}.json").write_text(json.dumps(entries))
    tuning.clear_caches()


def _entry(config):
    return {"config": config, "ms": 1.0, "default_ms": 2.0, "runner_up": {}, "runner_up_ms": 1.5}


def _attention(length=40, head_dim=16):
    """fused_attention forward+backward on triton and its float64 reference: (ours, truth)."""
    q, k, v = (torch.randn(3, 2, length, head_dim, dtype=torch.float64) for _ in "qkv")
    seq_lens, grad = torch.tensor([length, 7, 0]), torch.randn(3, 2, length, head_dim, dtype=torch.float64)

    def run(backend, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = sk.fused_attention(*inputs, seq_lens=seq_lens, backend=backend)
        out.backward(grad.to(dtype))
        return [out.detach().double()] + [t.grad.double() for t in inputs]

    return run("triton", torch.float32), run("reference", torch.float64)


def test_gpu_slug_names_the_table_file():
    assert tuning.gpu_slug("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert tuning.gpu_slug("NVIDIA H200") == "NVIDIA-H200"


def test_the_table_of_the_gpu_at_hand_is_launched(fake_gpu, launches):
    key = f"{tuning.dtype_key(torch.float32)}/d16/L64"  # float32, D=16, max_seqlen 40
    fake_gpu({
        "attention_fwd": {key: _entry(dict(BLOCK_M=16, BLOCK_N=32, num_warps=2, num_stages=1))},
        "attention_bwd": {key: _entry(dict(BLOCK_M=16, BLOCK_N=16, num_warps=2, num_stages=1))},
    })  # fmt: skip
    ours, truth = _attention()
    fwd, dq, dkdv = (launches[f"_attention_{name}_kernel"][0] for name in ("fwd", "bwd_dq", "bwd_dkdv"))
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["num_warps"]) == (16, 32, 2)
    assert (dq["BLOCK_M"], dq["BLOCK_N"], dkdv["BLOCK_N"], dq["num_warps"]) == (16, 16, 16, 2)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_other_gpus_and_unlisted_keys_get_the_defaults(fake_gpu, launches):
    fake_gpu({"attention_fwd": {"float32-highest/d16/L4096": _entry(dict(BLOCK_M=16, BLOCK_N=16))}})
    _attention()  # L64: not in the table
    default = triton_attention._default_launch_config(16, torch.float32, backward=False)
    assert launches["_attention_fwd_kernel"][0]["BLOCK_M"] == default["BLOCK_M"]
    fake_gpu({})  # no table for this GPU at all
    tuning.clear_caches()
    assert tuning.launch_config("attention_fwd", "x", torch.device("cuda"), {"BLOCK_M": 7}) == {"BLOCK_M": 7}


def test_cpu_tensors_never_read_a_table():
    assert tuning.device_name(torch.device("cpu")) is None
    assert tuning.launch_config("attention_fwd", "any", torch.device("cpu"), {"BLOCK_M": 7}) == {"BLOCK_M": 7}


def test_full_loss_reads_its_own_entries(fake_gpu, launches):
    hidden, weight = torch.randn(40, 20, requires_grad=True), torch.randn(30, 20, requires_grad=True)
    targets = torch.randint(1, 30, (40,))
    key = f"{tuning.dtype_key(torch.float32)}/d32/n32768"  # 30 items: the smallest catalog class
    fake_gpu({
        "full_softmax_fwd": {key: _entry(dict(BLOCK_T=32, BLOCK_N=16, num_warps=2, num_stages=1))},
        "full_softmax_bwd": {key: _entry(dict(BLOCK_T=16, BLOCK_N=32, num_warps=2, num_stages=1)),
                             key.replace("n32768", "n262144"): _entry(dict(BLOCK_T=32, BLOCK_N=16, num_warps=2,
                                                                           num_stages=1))},
    })  # fmt: skip
    sk.full_softmax_loss(hidden, weight, targets, backend="triton").backward()
    fwd, d_hidden = launches["_full_fwd_kernel"][0], launches["_full_bwd_hidden_kernel"][0]
    assert (fwd["BLOCK_T"], fwd["BLOCK_N"], d_hidden["BLOCK_T"], d_hidden["BLOCK_N"]) == (32, 16, 16, 32)
    truth = sk.full_softmax_loss(hidden.double(), weight.double(), targets, backend="reference")
    ours = sk.full_softmax_loss(hidden, weight, targets, backend="triton")
    torch.testing.assert_close(ours.double(), truth, atol=1e-5, rtol=1e-5)


def test_forcing_overrides_the_table_inside_its_block(fake_gpu, launches):
    fake_gpu({})
    with tuning.forcing("attention_fwd", dict(BLOCK_M=16, BLOCK_N=16)):
        _attention()
    _attention()
    assert [call["BLOCK_M"] for call in launches["_attention_fwd_kernel"]] == [16, 32]


def test_loss_keys_have_a_catalog_class():
    """A winner measured at one catalog size class is never applied at another."""
    key = tuning.loss_key(torch.bfloat16, 64, 131072)
    assert key == "bfloat16/d64/n262144" == tuning.loss_key(torch.bfloat16, 64, 2**18)
    assert [tuning.catalog_class(n) for n in (1, 2**15, 2**15 + 1, 2**18 + 1, 10**7)] == [
        "n32768", "n32768", "n262144", "n>262144", "n>262144",
    ]  # fmt: skip


def test_length_buckets_and_dtype_keys():
    assert [tuning.length_bucket(n) for n in (0, 1, 50, 64, 65, 200, 1024, 10**6)] == [
        64, 64, 64, 64, 128, 256, 1024, 8192,
    ]  # fmt: skip
    assert tuning.dtype_key(torch.bfloat16) == "bfloat16"
    with_mode = torch.get_float32_matmul_precision()
    assert tuning.dtype_key(torch.float32) == f"float32-{with_mode}"


def test_heavy_first_forward_computes_the_same(launches):
    """The forward with its query blocks scheduled last to first (a tuning candidate) is the
    same function: several blocks per sequence, causal, lengths that end mid-block."""
    with tuning.forcing("attention_fwd", dict(BLOCK_M=16, BLOCK_N=16, HEAVY_FIRST=True)):
        ours, truth = _attention(length=45)
    assert launches["_attention_fwd_kernel"][0]["HEAVY_FIRST"] is True
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_edge_only_masking_forward_computes_the_same(launches, causal, dropout_p):
    """The forward masking only the key tiles that cross the diagonal or a sequence's end (a
    tuning candidate) gives the default forward's outputs: lengths that end mid-tile, on a
    tile edge, 1 and 0, several query blocks per sequence, with and without dropout."""
    q, k, v = (torch.randn(5, 2, 70, 16) for _ in "qkv")
    seq_lens = torch.tensor([70, 33, 32, 1, 0])

    def run(config):
        torch.manual_seed(7)  # the same dropout seed
        with tuning.forcing("attention_fwd", config):
            return sk.fused_attention(q, k, v, seq_lens=seq_lens, causal=causal, dropout_p=dropout_p,
                                      backend="triton", return_lse=True)  # fmt: skip

    blocks = dict(BLOCK_M=32, BLOCK_N=16)
    (out, lse), (expected, expected_lse) = run(dict(blocks, MASK_EDGES_ONLY=True)), run(blocks)
    assert launches["_attention_fwd_kernel"][0]["MASK_EDGES_ONLY"] is True
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-5)
