"""seqrec_kernels.nn.MultiheadAttention and replace_attention on their own: every call
form against torch.nn.MultiheadAttention on the same weights (float64 truth, float32
baseline), the mask mapping and its cache, the documented errors and the fallback,
dropout, state_dict compatibility and the in-place swap."""

import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import seqrec_kernels.nn.attention as nn_attention
from attention_helpers import assert_flash_rule
from seqrec_kernels import fused_attention
from seqrec_kernels.nn import MultiheadAttention, replace_attention

E, H, L, N = 16, 2, 5, 3  # embed dim, heads, length, batch


def causal_bool(length=L):
    return torch.ones(length, length, dtype=torch.bool).triu(1)


def causal_float(length=L):
    return torch.zeros(length, length).masked_fill(causal_bool(length), -math.inf)


def padding_mask(lengths, side, length=L):
    """[N, L] bool, True at padding."""
    index = torch.arange(length)[None]
    return index < length - lengths[:, None] if side == "left" else index >= lengths[:, None]


def inputs(batch_first, same=True, dtype=torch.float32):
    """query, key, value in torch's layout; key is value, and query too when same."""
    shape = (N, L, E) if batch_first else (L, N, E)
    x = torch.randn(shape, dtype=dtype)
    return (x, x, x) if same else (torch.randn(shape, dtype=dtype), x, x)


def check_module_against_torch(torch_module, call, rows=None, **options):
    """call(module, dtype) -> output; ours (a copy of torch_module as the drop-in, float32)
    vs torch's module in float64 (truth) and float32 (baseline) by the tolerance rule,
    outputs and input-projection gradients, at `rows` (a boolean index of the output) or
    everywhere."""
    ours = MultiheadAttention.from_torch(copy.deepcopy(torch_module), **options)
    truth = copy.deepcopy(torch_module).double()
    results = []
    for module, dtype in ((ours, torch.float32), (truth, torch.float64), (torch_module, torch.float32)):
        module.zero_grad(set_to_none=True)
        out = call(module, dtype)
        out = out if rows is None else out[rows]
        out.sum().backward()
        weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
        results.append((out.detach(), weight.grad.detach()))
    (out, grad), (truth_out, truth_grad), (base_out, base_grad) = results
    assert out.dtype == torch.float32
    assert_flash_rule("output", out, truth_out, base_out, torch.float32, 2)
    assert_flash_rule("d in_proj", grad, truth_grad, base_grad, torch.float32, 3)


# How the causal mask is given to the drop-in: (attn_mask, is_causal, options); None: no mask.
CAUSAL_FORMS = {
    "none": None,
    "bool mask": (causal_bool, False, {}),
    "float mask": (causal_float, False, {}),
    "is_causal with mask": (causal_bool, True, {}),
    "is_causal without mask": (lambda: None, True, {}),
    "assume_causal": (causal_bool, False, {"assume_causal": True}),
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("form", CAUSAL_FORMS)
@pytest.mark.parametrize("same", [True, False])
def test_masks_and_layouts_match_torch(batch_first, form, same):
    """Self-attention and normed queries over other keys, both layouts; the causal mask in
    every accepted form (torch gets the boolean mask); no mask is dense attention."""
    module = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    query, key, value = inputs(batch_first, same)
    make_mask, is_causal, options = CAUSAL_FORMS[form] or (lambda: None, False, {})

    def call(m, dtype):
        q, k, v = (t.to(dtype) for t in (query, key, value))
        if same:
            k = v = q
        if not isinstance(m, MultiheadAttention):
            return m(q, k, v, attn_mask=None if CAUSAL_FORMS[form] is None else causal_bool())[0]
        mask = make_mask()
        mask = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
        return m(q, k, v, attn_mask=mask, is_causal=is_causal)[0]

    check_module_against_torch(module, call, **options)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("float_mask", [False, True])
def test_key_padding_mask_matches_torch_at_real_rows(side, causal, batch_first, float_mask):
    """Lengths L, 2 and 0; outputs compared at real tokens (padding rows are defined
    differently: there the output is out_proj.bias, checked below), bool and float masks.
    need_weights=False: with weights, torch's rows that see no key are NaN, and so are its
    gradients."""
    module = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    nn.init.normal_(module.out_proj.bias)
    lengths = torch.tensor([L, 2, 0])
    pad = padding_mask(lengths, side)  # [N, L]
    query, key, value = inputs(batch_first, same=False)
    rows = ~pad if batch_first else ~pad.T

    def call(m, dtype):
        kpm = torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, -math.inf) if float_mask else pad
        mask = causal_bool() if causal else None
        if float_mask and causal:
            mask = causal_float().to(dtype)
        q, k, v = (t.to(dtype) for t in (query, key, value))
        return m(q, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=False)[0]

    check_module_against_torch(module, call, rows=rows)
    ours = MultiheadAttention.from_torch(module)
    out = call(ours, torch.float32)
    assert torch.equal(out[~rows], module.out_proj.bias.detach().expand_as(out[~rows]))


def test_unbatched_kdim_vdim_and_no_bias_match_torch():
    """Unbatched [L, E] input with a [L] padding mask; separate key/value sizes (separate
    projection weights); bias=False."""
    module = nn.MultiheadAttention(E, H, bias=False, kdim=6, vdim=10).eval()
    query, key, value = torch.randn(L, E), torch.randn(L, 6), torch.randn(L, 10)
    pad = torch.arange(L) < 2  # left padding

    def call(m, dtype):
        q, k, v = (t.to(dtype) for t in (query, key, value))
        return m(q, k, v, key_padding_mask=pad, attn_mask=causal_bool(), need_weights=False)[0]

    check_module_against_torch(module, call, rows=~pad)


def test_need_weights():
    """Default: (output, None) whatever need_weights says; strict=True raises; strict with
    fallback returns torch's weights."""
    module = nn.MultiheadAttention(E, H).eval()
    query = inputs(batch_first=False)[0]
    out, weights = MultiheadAttention.from_torch(module)(query, query, query)
    assert weights is None
    with pytest.raises(ValueError, match="need_weights: .*need_weights=False"):
        MultiheadAttention.from_torch(module, strict=True)(query, query, query)
    strict = MultiheadAttention.from_torch(module, strict=True)
    assert strict(query, query, query, need_weights=False)[1] is None
    torch_out, torch_weights = module(query, query, query, average_attn_weights=False)
    fallback_out, fallback_weights = MultiheadAttention.from_torch(module, strict=True, fallback=True)(
        query, query, query, average_attn_weights=False
    )
    assert torch.equal(fallback_weights, torch_weights) and torch.equal(fallback_out, torch_out)
    torch.testing.assert_close(out, torch_out)


def unsupported_calls():
    """(name, constructor options, call(module) ) of everything the drop-in cannot express,
    with the argument its error names."""
    q, k, v = inputs(batch_first=False, same=False)
    short = torch.randn(L - 1, N, E)
    mixed = torch.stack([padding_mask(torch.tensor([2]), "left")[0], padding_mask(torch.tensor([3]), "right")[0]])
    mixed = torch.cat([mixed, mixed[:1]])
    hole = torch.zeros(N, L, dtype=torch.bool)
    hole[1, 2] = True
    lower = causal_bool().T
    finite = torch.zeros(L, L).masked_fill(causal_bool(), -1e9)
    return [
        ("attn_mask", {}, lambda m: m(q, k, v, attn_mask=lower)),
        ("attn_mask", {}, lambda m: m(q, k, v, attn_mask=finite)),
        ("attn_mask", {}, lambda m: m(q, k, v, attn_mask=causal_bool().expand(N * H, L, L))),
        ("key_padding_mask", {}, lambda m: m(q, k, v, key_padding_mask=mixed)),
        ("key_padding_mask", {}, lambda m: m(q, k, v, key_padding_mask=hole)),
        ("key_padding_mask", {}, lambda m: m(q, k, v, key_padding_mask=torch.zeros(N, L).masked_fill(hole, -5.0))),
        ("key", {}, lambda m: m(q, short, short)),
        ("need_weights", {"strict": True}, lambda m: m(q, k, v)),
    ]


@pytest.mark.parametrize("case", range(len(unsupported_calls())))
def test_unsupported_calls_raise_or_fall_back(case, caplog):
    """Each raises a ValueError naming the argument and saying how to proceed; with
    fallback=True the call runs torch's implementation (the same output as torch's
    module) and the module logs that once."""
    name, options, call = unsupported_calls()[case]
    module = nn.MultiheadAttention(E, H).eval()
    with pytest.raises(ValueError, match=f"^{name}: .*(pass|use|fold|build|fallback)"):
        call(MultiheadAttention.from_torch(module, **options))
    ours = MultiheadAttention.from_torch(module, fallback=True, **options)
    with caplog.at_level(logging.WARNING, logger="seqrec_kernels"):
        out = call(ours)[0]
        call(ours)
    assert torch.equal(out, call(module)[0])
    assert len([r for r in caplog.records if "PyTorch's implementation" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("add_bias_kv", {"add_bias_kv": True}), ("add_zero_attn", {"add_zero_attn": True}), ("num_heads", {})],
)
def test_unsupported_modules_raise_or_fall_back(name, kwargs):
    """Module options the kernels cannot run raise at construction (and in
    replace_attention) naming the option; with fallback=True every call runs torch's."""
    embed_dim, heads = (2 * 257, 2) if name == "num_heads" else (E, H)
    with pytest.raises(ValueError, match=f"^{name}: .*fallback=True"):
        MultiheadAttention(embed_dim, heads, **kwargs)
    module = nn.MultiheadAttention(embed_dim, heads, **kwargs).eval()
    with pytest.raises(ValueError, match=f"^{name}: "):
        replace_attention(nn.Sequential(module))
    ours = MultiheadAttention.from_torch(module, fallback=True)
    x = torch.randn(L, N, embed_dim)
    assert torch.equal(ours(x, x, x, attn_mask=causal_bool())[0], module(x, x, x, attn_mask=causal_bool())[0])


def test_invalid_input_raises_even_with_fallback():
    ours = MultiheadAttention(E, H, fallback=True)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="^key_padding_mask: expected shape"):
        ours(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="^attn_mask: expected shape"):
        ours(x, x, x, attn_mask=causal_bool(L + 1))
    with pytest.raises(ValueError, match="^value: expected 3 dimensions .* last dimension 16"):
        ours(x, x, torch.randn(L, N, E + 1))
    with pytest.raises(ValueError, match="^assume_padding_side: expected one of"):
        MultiheadAttention(E, H, assume_padding_side="middle")
    with pytest.raises(ValueError, match="^backend: expected one of"):
        MultiheadAttention(E, H, backend="cudnn")


class MaskReads(TorchDispatchMode):
    """Records every op that reads the watched tensor."""

    def __init__(self, watched):
        super().__init__()
        self.watched, self.ops = watched, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is self.watched for t in tree_leaves((args, kwargs or {}))):
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


def counting(monkeypatch, name):
    """Counts the calls of the mask reader `name` (the only code that reads mask values)."""
    calls = []
    reader = getattr(nn_attention, name)
    monkeypatch.setattr(nn_attention, name, lambda mask: calls.append(mask) or reader(mask))
    return calls


def test_mask_verdicts_are_cached_without_a_host_sync(monkeypatch):
    """The second call with the same mask (and the next layer's call) reads nothing: no op
    touches the mask, so no host sync; an in-place change, or a new tensor with the same
    values after the old one is freed, is read again."""
    reads = counting(monkeypatch, "_read_attn_mask")
    pad_reads = counting(monkeypatch, "_read_key_padding_mask")
    first, second = (MultiheadAttention(E, H).eval() for _ in range(2))
    x = torch.randn(L, N, E)
    mask, pad = causal_bool(), padding_mask(torch.tensor([L, 2, 0]), "left")
    with torch.no_grad():
        expected = first(x, x, x, attn_mask=mask, key_padding_mask=pad)[0]
        assert (len(reads), len(pad_reads)) == (1, 1)
        for module in (second, first):
            with MaskReads(mask) as mask_ops, MaskReads(pad) as pad_ops:
                out = module(x, x, x, attn_mask=mask, key_padding_mask=pad)[0]
            assert mask_ops.ops == [] and pad_ops.ops == [], "a cached verdict must not read the mask"
        assert (len(reads), len(pad_reads)) == (1, 1)
        assert torch.equal(out, expected)

        mask[0, 1] = False  # in place: a new version, read again, no longer causal
        with pytest.raises(ValueError, match="^attn_mask: only the causal mask"):
            first(x, x, x, attn_mask=mask)
        assert len(reads) == 2
        del mask
        fresh = causal_bool()
        first(x, x, x, attn_mask=fresh)
        assert len(reads) == 3


def test_hints_skip_mask_reading(monkeypatch):
    """is_causal=True, assume_causal and assume_padding_side never read masks, and give the
    same output as the read verdicts."""
    reads = counting(monkeypatch, "_read_attn_mask")
    pad_reads = counting(monkeypatch, "_read_key_padding_mask")
    module = MultiheadAttention(E, H).eval()
    hinted = MultiheadAttention.from_torch(module, assume_causal=True, assume_padding_side="right")
    x = torch.randn(L, N, E)
    pad = padding_mask(torch.tensor([L, 2, 0]), "right")
    with torch.no_grad():
        out = module(x, x, x, attn_mask=causal_bool(), is_causal=True, key_padding_mask=pad)[0]
        assert (len(reads), len(pad_reads)) == (0, 1)
        assert torch.equal(hinted(x, x, x, attn_mask=causal_bool(), key_padding_mask=pad)[0], out)
        assert (len(reads), len(pad_reads)) == (0, 1)
        assert torch.equal(module(x, x, x, attn_mask=causal_bool(), key_padding_mask=pad)[0], out)


def test_dropout_is_fused_attention_dropout_in_training_only():
    """Training mode drops attention probabilities with p = dropout exactly as
    fused_attention does (same seed draw); eval mode drops nothing."""
    module = MultiheadAttention(E, H, dropout=0.4, backend="reference")
    x = torch.randn(L, N, E)
    state = torch.get_rng_state()
    out = module(x, x, x, attn_mask=causal_bool())[0]
    torch.set_rng_state(state)
    q, k, v = torch.nn.functional.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    heads = [t.reshape(L, N, H, E // H).permute(1, 2, 0, 3) for t in (q, k, v)]  # [N, H, L, D]
    attention = fused_attention(*heads, causal=True, dropout_p=0.4, backend="reference")
    expected = module.out_proj(attention.permute(2, 0, 1, 3).reshape(L, N, E))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    no_dropout = MultiheadAttention.from_torch(module).eval()
    eval_out = no_dropout(x, x, x, attn_mask=causal_bool())[0]
    assert not torch.allclose(out, eval_out)
    torch_eval = nn.MultiheadAttention(E, H, dropout=0.4).eval()
    torch_eval.load_state_dict(module.state_dict())
    torch.testing.assert_close(eval_out, torch_eval(x, x, x, attn_mask=causal_bool())[0])


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 6, "vdim": 10, "bias": False}])
def test_state_dict_round_trips_with_torch(kwargs):
    """Checkpoints load both ways with strict key matching and give the same outputs."""
    torch_module = nn.MultiheadAttention(E, H, **kwargs).eval()
    ours = MultiheadAttention(E, H, **kwargs).eval()
    assert ours.state_dict().keys() == torch_module.state_dict().keys()
    ours.load_state_dict(torch_module.state_dict())
    back = nn.MultiheadAttention(E, H, **kwargs).eval()
    back.load_state_dict(ours.state_dict())
    for name, tensor in torch_module.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor) and torch.equal(ours.state_dict()[name], tensor)
    query, key, value = (torch.randn(L, N, kwargs.get(dim, E)) for dim in ("embed_dim", "kdim", "vdim"))
    torch.testing.assert_close(ours(query, key, value)[0], back(query, key, value)[0])


def test_replace_attention_swaps_in_place():
    """Every torch.nn.MultiheadAttention at any depth, once each (a shared module stays
    shared), keeping the Parameter objects, device, dtype and each module's training
    mode; options reach the new modules; a second call replaces nothing."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(E, H, dim_feedforward=32), num_layers=2, enable_nested_tensor=False
            )
            self.shared = nn.MultiheadAttention(E, H)
            self.blocks = nn.ModuleList([nn.Sequential(self.shared), nn.Linear(E, E)])

    model = Model().double()
    model.encoder.layers[1].self_attn.eval()
    old = {name: p for name, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    assert replace_attention(model, backend="reference", assume_causal=True) == 3
    assert model.blocks[0][0] is model.shared and isinstance(model.shared, MultiheadAttention)
    layers = [model.encoder.layers[0].self_attn, model.encoder.layers[1].self_attn, model.shared]
    assert all(isinstance(m, MultiheadAttention) and m.assume_causal for m in layers)
    assert [m.training for m in layers] == [True, False, True]
    assert all(old[name] is p for name, p in model.named_parameters())
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert model.state_dict().keys() == state.keys()
    assert replace_attention(model) == 0
    with pytest.raises(ValueError, match="^model: is itself a torch.nn.MultiheadAttention"):
        replace_attention(nn.MultiheadAttention(E, H))


def test_compiles_with_hints():
    """torch.compile(fullgraph=True) traces the drop-in when the masks need no reading
    (is_causal=True, assume_padding_side), and computes what eager mode does."""
    module = MultiheadAttention(E, H, batch_first=True, backend="reference", assume_padding_side="left").eval()
    x = torch.randn(N, L, E)
    pad = padding_mask(torch.tensor([L, 2, 0]), "left")

    def call(x, pad):
        return module(x, x, x, key_padding_mask=pad, attn_mask=causal_bool(), is_causal=True, need_weights=False)[0]

    torch.testing.assert_close(torch.compile(call, fullgraph=True)(x, pad), call(x, pad), rtol=0, atol=1e-6)
