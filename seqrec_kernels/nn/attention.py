"""`MultiheadAttention`: torch.nn.MultiheadAttention running on fused_attention, and
`replace_attention`, which swaps it into an existing model.

The module keeps torch's constructor, parameters, state_dict keys and forward contract,
and maps the masks it is given onto fused_attention's arguments: the causal mask (or
is_causal) to causal=True, a key_padding_mask that pads one side of every row to seq_lens
and padding_side, no mask to dense attention. Reading a mask's values costs a host sync,
so the verdict on each mask tensor is cached (per tensor object and in-place version) and
the is_causal / assume_* hints skip the reading altogether.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import weakref
from typing import Literal

import torch
import torch.nn.functional as F

from .._checks import check_bool, check_choice, values_checkable
from .._limits import MAX_HEAD_DIM
from ..backends import Backend
from ..ops.attention import fused_attention

logger = logging.getLogger("seqrec_kernels")

PADDING_SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class _Padding:
    """What a key_padding_mask means for fused_attention."""

    seq_lens: torch.Tensor  # [N] real tokens per row
    side: Literal["left", "right"]


class _VerdictCache:
    """Verdicts on mask tensors, so that the same mask passed again (to the next layer, or
    on the next step) is not read again. An entry matches only the very tensor object it
    was computed for (held by a weak reference, so a freed mask's entry never matches a
    new tensor that reuses its address) with the same in-place version, shape, dtype and
    device."""

    def __init__(self, size: int = 16):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()

    @staticmethod
    def _signature(mask: torch.Tensor):
        return mask._version, mask.shape, mask.dtype, mask.device

    def verdict(self, kind: str, mask: torch.Tensor, read):
        """The verdict on `mask`: cached, or `read(mask)` (and cached)."""
        key = (kind, id(mask))
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is mask and entry[1] == self._signature(mask):
            self._entries.move_to_end(key)
            return entry[2]
        verdict = read(mask)
        self._entries[key] = (weakref.ref(mask), self._signature(mask), verdict)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return verdict


_VERDICTS = _VerdictCache()


def _read_attn_mask(mask: torch.Tensor) -> str | None:
    """None when mask [L, L] is the causal mask (True, or -inf, strictly above the
    diagonal; False, or 0, elsewhere), else why it is not. Reads the mask on the host."""
    length = mask.shape[0]
    above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)  # [L, L]
    if mask.dtype == torch.bool:
        is_causal = torch.equal(mask, above)
    else:
        is_causal = bool(((mask == -math.inf) == above).all() & (mask.masked_fill(above, 0.0) == 0).all())
    if is_causal:
        return None
    return (
        "attn_mask: only the causal mask is supported (True, or -inf, strictly above the diagonal; False, or 0, "
        "elsewhere), got another mask; pass is_causal=True with the causal mask, fold padding into "
        "key_padding_mask, or build the module with fallback=True to run PyTorch's attention for such masks"
    )


def _read_key_padding_mask(mask: torch.Tensor) -> _Padding | str:
    """The lengths and padding side of mask [N, S] (or unbatched [S]; True, or -inf, at
    padding), or why they do not exist. Reads the mask on the host (one sync)."""
    mask = mask.reshape(-1, mask.shape[-1])  # [N, S]
    padded = mask if mask.dtype == torch.bool else mask == -math.inf  # [N, S]
    values_ok = torch.ones((), dtype=torch.bool, device=mask.device)
    if mask.dtype != torch.bool:
        values_ok = ((mask == 0) | padded).all()
    length = mask.shape[1]
    seq_lens = (~padded).sum(1)  # [N]
    index = torch.arange(length, device=mask.device)[None, :]  # [1, S]
    left = (padded == (index < length - seq_lens[:, None])).all()
    right = (padded == (index >= seq_lens[:, None])).all()
    values_ok, left, right = torch.stack([values_ok, left, right]).tolist()
    if not values_ok:
        return "key_padding_mask: a float mask must hold only 0 (attend) and -inf (padding); pass a boolean mask"
    if left or right:
        return _Padding(seq_lens, "left" if left else "right")
    return (
        "key_padding_mask: the padding (True) of every row must be one run at the start of the row (left "
        "padding) or at its end (right padding), the same side for all rows; pad the batch that way or build "
        "the module with fallback=True to run PyTorch's attention for such masks"
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The fused_attention arguments a forward call maps to."""

    causal: bool
    padding: _Padding | None


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention on `fused_attention`: same constructor, parameters,
    state_dict keys and forward signature, so checkpoints load both ways and call sites
    need no change. Outputs equal torch's (to rounding) wherever both are defined.

    What a call maps to:
    - `is_causal=True` (with or without `attn_mask`; the mask is then not read, as torch
      documents the hint), or an `attn_mask` [L, L] that is the causal mask (boolean True,
      or float -inf, strictly above the diagonal and False/0 elsewhere): causal attention.
      No mask: dense attention, padding included, as torch computes it.
    - `key_padding_mask` [N, S] (bool True, or float -inf, at padding) whose padding is one
      run at the start of every row (left padding, as SASRec pads) or at the end of every
      row (right padding): `seq_lens` and `padding_side`. Rows of a real query attend to the
      real keys, as in torch. Rows of a *padding* query (where key_padding_mask is True)
      are defined differently: their attention output is 0, so the module returns
      `out_proj.bias` there, and no gradient flows from them into query, key or value.
      (torch gives such a row the average of the real keys it may see; where it sees
      none, NaN with need_weights=True and `out_proj.bias` with need_weights=False.)
      Models discard these rows.
    - Dropout (`dropout`, training mode only) drops attention probabilities as torch does,
      with fused_attention's own random mask (not torch's random stream).
    - `need_weights=True` (torch's default) returns `(output, None)`: the fused kernels
      never form the weights. With `strict=True` it raises instead (or, with
      `fallback=True`, runs PyTorch's implementation and returns its weights).
    - Query, key and value may differ (cross-attention, or normed queries over un-normed
      keys) when key and query have the same length; `kdim`/`vdim`, `bias=False`, both
      `batch_first` settings and unbatched inputs work as in torch.

    Anything else (other masks, a 3-D attn_mask, key length != query length,
    `add_bias_kv`, `add_zero_attn`, head dim > 256, nested tensors) raises a ValueError
    that names the argument and says how to proceed, unless `fallback=True`: then such
    calls run torch's implementation, logged once per module on the `seqrec_kernels` logger.

    Mask reading costs one host sync, once per mask tensor: the verdict is cached per tensor
    object and in-place version, so a mask built once (or shared by every layer of a
    forward) is read once. Masks built fresh on every call (nn.TransformerEncoderLayer
    converts boolean masks to fresh float masks) are read on every call; to skip the
    reading pass `is_causal=True`, or build the module with `assume_causal=True` (every
    attn_mask given is the causal mask) and `assume_padding_side="left"|"right"` (every
    key_padding_mask pads that side). While torch.compile traces or a CUDA graph is
    captured masks cannot be read, so only these hints work there.

    Extra keyword-only options: `backend` ("auto", "reference", "triton", "cuda", "cpp"),
    `fallback`, `strict`, `assume_causal`, `assume_padding_side`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str | Backend = "auto",
        fallback: bool = False,
        strict: bool = False,
        assume_causal: bool = False,
        assume_padding_side: Literal["left", "right"] | None = None,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        )
        self.backend = Backend.parse(backend)
        for name, value in (("fallback", fallback), ("strict", strict), ("assume_causal", assume_causal)):
            check_bool(name, value)
        if assume_padding_side is not None:
            check_choice("assume_padding_side", assume_padding_side, PADDING_SIDES)
        self.fallback, self.strict = fallback, strict
        self.assume_causal, self.assume_padding_side = assume_causal, assume_padding_side
        self._fallback_logged = False
        self._unsupported_module = self._module_limitation()
        if self._unsupported_module is not None and not fallback:
            raise ValueError(self._unsupported_module)

    def _module_limitation(self) -> str | None:
        """Why this module's configuration cannot run on fused_attention (None: it can)."""
        how = "; build it without it, or with fallback=True to run PyTorch's implementation"
        if self.bias_k is not None:
            return "add_bias_kv: the fused kernels cannot attend to extra learned key/value rows" + how
        if self.add_zero_attn:
            return "add_zero_attn: the fused kernels cannot attend to an extra zero key/value row" + how
        if self.head_dim > MAX_HEAD_DIM:
            return (
                f"num_heads: the head dim embed_dim / num_heads = {self.head_dim} exceeds the fused kernels' "
                f"{MAX_HEAD_DIM}; use more heads, or fallback=True to run PyTorch's implementation"
            )
        return None

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention, **options) -> MultiheadAttention:
        """The drop-in for `module`, holding the very same Parameter objects (so an optimizer
        built over them keeps working), in its training mode; `options` are the extra
        keyword-only options. Hooks registered on `module` are not carried over."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module: expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        new = cls(
            module.embed_dim, module.num_heads, module.dropout, bias=module.in_proj_bias is not None,
            add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
            vdim=module.vdim, batch_first=module.batch_first, device="meta", **options,
        )  # fmt: skip
        for name, parameter in module.named_parameters(recurse=False):
            setattr(new, name, parameter)
        new.out_proj = module.out_proj
        return new.train(module.training)

    def extra_repr(self) -> str:
        hints = f", assume_causal={self.assume_causal}, assume_padding_side={self.assume_padding_side!r}"
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}, backend={self.backend.value!r}, fallback={self.fallback}, "
            f"strict={self.strict}" + hints
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """torch.nn.MultiheadAttention.forward on fused_attention -> (output, None): the
        attention weights are not computed (see the class docstring for `need_weights`,
        the mask mapping and what falls back)."""
        plan = self._plan(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        if isinstance(plan, str):
            if not self.fallback:
                raise ValueError(plan)
            if not self._fallback_logged:
                logger.warning("seqrec_kernels.nn.MultiheadAttention runs PyTorch's implementation: %s", plan)
                self._fallback_logged = True
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        return self._fused_forward(query, key, value, plan), None

    def _plan(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal) -> _Plan | str:
        """The fused_attention arguments for this call, or why there are none. Invalid
        input (what torch rejects too) raises here, fallback or not."""
        if self._unsupported_module is not None:
            return self._unsupported_module
        if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
            return "query: nested tensors are not supported; pass padded tensors with a key_padding_mask"
        self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if need_weights and self.strict:
            return (
                "need_weights: the fused kernels never form the attention weights; pass need_weights=False, "
                "build the module with strict=False to get None weights, or with fallback=True to get them "
                "from PyTorch's implementation"
            )
        seq_dim = 1 if self.batch_first and query.dim() == 3 else 0
        if key.shape[seq_dim] != query.shape[seq_dim]:
            return (
                f"key: fused attention needs as many keys as queries (query length {query.shape[seq_dim]}, key "
                f"length {key.shape[seq_dim]}); use torch.nn.MultiheadAttention, or fallback=True"
            )
        causal = is_causal or (attn_mask is not None and self.assume_causal)
        if attn_mask is not None and not causal:
            verdict = self._attn_mask_verdict(attn_mask)
            if verdict is not None:
                return verdict
            causal = True
        padding = None
        if key_padding_mask is not None:
            padding = self._padding(key_padding_mask)
            if isinstance(padding, str):
                return padding
        return _Plan(causal, padding)

    def _attn_mask_verdict(self, attn_mask: torch.Tensor) -> str | None:
        if attn_mask.dim() != 2:
            return (
                f"attn_mask: only a 2-D causal mask [L, L] is supported, got shape {tuple(attn_mask.shape)}; pass the "
                "[L, L] causal mask (or is_causal=True) and the padding as key_padding_mask, or fallback=True"
            )
        if not values_checkable():
            return (
                "attn_mask: masks cannot be read while torch.compile traces or a CUDA graph is captured; pass "
                "is_causal=True with the causal mask or build the module with assume_causal=True"
            )
        return _VERDICTS.verdict("attn_mask", attn_mask, _read_attn_mask)

    def _padding(self, mask: torch.Tensor) -> _Padding | str:
        """mask [N, S] (or [S]) -> lengths and side: assumed (no reading) or read once per mask tensor."""
        if self.assume_padding_side is not None:
            real = ~mask if mask.dtype == torch.bool else mask == 0  # [N, S] or [S]
            return _Padding(real.reshape(-1, mask.shape[-1]).sum(1), self.assume_padding_side)
        if not values_checkable():
            return (
                "key_padding_mask: masks cannot be read while torch.compile traces or a CUDA graph is captured; "
                "build the module with assume_padding_side='left' or 'right'"
            )
        return _VERDICTS.verdict("key_padding_mask", mask, _read_key_padding_mask)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> None:
        """Raises ValueError/TypeError for input torch's MultiheadAttention rejects too."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query: expected 3 dimensions ([L, N, E], or [N, L, E] with batch_first) or 2 (unbatched [L, E]), "
                f"got shape {tuple(query.shape)}"
            )
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != query.dim() or t.shape[-1] != dim:
                raise ValueError(
                    f"{name}: expected {query.dim()} dimensions (those of query) with last dimension {dim}, "
                    f"got shape {tuple(t.shape)}"
                )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"value: expected the leading shape of key {tuple(key.shape[:-1])}, got {tuple(value.shape[:-1])}"
            )
        batched = query.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if batched and key.shape[batch_dim] != query.shape[batch_dim]:
            raise ValueError(
                f"key: expected batch size {query.shape[batch_dim]} (that of query), got {key.shape[batch_dim]}"
            )
        source_len = key.shape[1 if self.batch_first and batched else 0]
        if key_padding_mask is not None:
            expected = (query.shape[batch_dim], source_len) if batched else (source_len,)
            if tuple(key_padding_mask.shape) != expected:
                layout = "[N, S]" if batched else "[S]"
                raise ValueError(
                    f"key_padding_mask: expected shape {expected} {layout}, got {tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
                raise TypeError(f"key_padding_mask: expected a bool or float tensor, got {key_padding_mask.dtype}")
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask: expected a bool or float tensor, got {attn_mask.dtype}")
            target_len = query.shape[1 if self.batch_first and batched else 0]
            if attn_mask.dim() == 2 and attn_mask.shape != (target_len, source_len):
                raise ValueError(
                    f"attn_mask: expected shape {(target_len, source_len)} [L, S], got {tuple(attn_mask.shape)}"
                )

    def _project(self, query, key, value):
        """The input projections, as torch computes them: -> q, k, v with the inputs' layouts."""
        embed_dim = self.embed_dim
        bias_q = bias_k = bias_v = None
        if self.in_proj_bias is not None:
            bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, bias_q),
                F.linear(key, self.k_proj_weight, bias_k),
                F.linear(value, self.v_proj_weight, bias_v),
            )
        if query is key and key is value:  # one matmul for the three
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        q = F.linear(query, weight_q, bias_q)
        if key is value:
            bias_kv = None if self.in_proj_bias is None else self.in_proj_bias[embed_dim:]
            k, v = F.linear(key, self.in_proj_weight[embed_dim:], bias_kv).chunk(2, dim=-1)
            return q, k, v
        return q, F.linear(key, weight_k, bias_k), F.linear(value, weight_v, bias_v)

    def _fused_forward(self, query, key, value, plan: _Plan) -> torch.Tensor:
        batched = query.dim() == 3
        if not batched:  # [L, E] -> [L, 1, E]: sequence-first with one row, as torch treats it
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        sequence_first = not (self.batch_first and batched)
        q, k, v = self._project(query, key, value)  # [L, N, E] (sequence-first) or [N, L, E]
        heads, head_dim = self.num_heads, self.head_dim

        def split_heads(x):  # -> [N, H, L, D], a view
            if sequence_first:
                return x.unflatten(-1, (heads, head_dim)).permute(1, 2, 0, 3)
            return x.unflatten(-1, (heads, head_dim)).transpose(1, 2)

        padding = plan.padding
        out = fused_attention(
            split_heads(q), split_heads(k), split_heads(v), causal=plan.causal,
            seq_lens=None if padding is None else padding.seq_lens,
            padding_side="left" if padding is None else padding.side,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend,
        )  # fmt: skip  # [N, H, L, D]
        out = out.permute(2, 0, 1, 3) if sequence_first else out.transpose(1, 2)  # [L, N, H, D] or [N, L, H, D]
        out = F.linear(out.flatten(-2), self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(1)


def replace_attention(model: torch.nn.Module, **options) -> int:
    """Swaps every torch.nn.MultiheadAttention inside `model` (its submodules, at any depth)
    for `seqrec_kernels.nn.MultiheadAttention` in place and returns how many it replaced.

    The new modules hold the very same Parameter objects (so the device, dtype, values and
    any optimizer built over them carry over) and the same training mode; `options` are
    the drop-in's keyword-only options (backend, fallback, strict, assume_causal,
    assume_padding_side). Subclasses of torch's module (which may override forward) and
    modules already replaced are left alone; a module shared by several parents is
    replaced by one shared drop-in. Hooks registered on the replaced modules are not
    carried over.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model) is torch.nn.MultiheadAttention:
        raise ValueError(
            "model: is itself a torch.nn.MultiheadAttention, which cannot be replaced in place; use "
            "seqrec_kernels.nn.MultiheadAttention.from_torch(model)"
        )
    replacements: dict[int, MultiheadAttention] = {}
    slots = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.MultiheadAttention
    ]
    for parent, name, child in slots:
        if id(child) not in replacements:
            replacements[id(child)] = MultiheadAttention.from_torch(child, **options)
        setattr(parent, name, replacements[id(child)])
    return len(replacements)
