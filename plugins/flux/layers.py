"""FLUX building blocks. Module and parameter names follow Black Forest Labs' reference
code exactly, so the native state dict *is* the BFL layout (flux1-dev.safetensors loads as is).

Blocks work on "grouped" tokens (see layout.py): ``(n, l, d)`` for a uniform stream,
``(L, d)`` otherwise; ``stream.tok(m)`` makes a per-sample tensor broadcast per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layout import Layout, Stream
from .rope import apply_rope


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0, factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding ``[cos, sin]`` of ``factor * t`` (float32), as FLUX and diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (factor * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class _Relayout(torch.autograd.Function):
    """``cat([x, 0])[fwd]`` whose backward is the gather ``cat([g, 0])[bwd]``, not a scatter-add.

    For row maps that are bijections between the real rows of two layouts (the extra zero
    row stands for padding), ``bwd`` being ``fwd``'s inverse. A gather's own backward is a
    scatter-add, which inductor on CPU compiles into atomic adds (slow, and the summation
    order varies); the inverse gather is exact and fuses like the forward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fwd: Tensor, bwd: Tensor) -> Tensor:
        ctx.save_for_backward(bwd)
        return _rows(x, fwd)

    @staticmethod
    def backward(ctx, g: Tensor):
        (bwd,) = ctx.saved_tensors
        return _rows(g, bwd), None, None


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """``cat([x, 0])[index]`` without the concatenation, which inductor would write out
    in full before gathering from it: a masked gather, one fused loop."""
    n = x.shape[0]
    picked = x.index_select(0, index.clamp(max=max(n - 1, 0)))
    return torch.where((index < n).view(-1, *(1,) * (x.dim() - 1)), picked, 0)


def relayout(x: Tensor, fwd: Tensor, bwd: Tensor) -> Tensor:
    return _Relayout.apply(x, fwd, bwd)


class _PerToken(torch.autograd.Function):
    """``m[seg]`` (a gather that fuses into its consumers) whose backward is ``onehot.T @ g``:
    the per-sample sum over tokens as one GEMM, deterministic, no atomic scatter-add."""

    @staticmethod
    def forward(ctx, m: Tensor, seg: Tensor, onehot: Tensor) -> Tensor:
        ctx.save_for_backward(onehot)
        return m.index_select(0, seg)

    @staticmethod
    def backward(ctx, g: Tensor):
        (onehot,) = ctx.saved_tensors
        return onehot.to(g.dtype).t() @ g, None, None


class _BiasAdd(torch.autograd.Function):
    """``y + b`` whose bias gradient is the GEMM ``ones @ g``: inductor's CPU code sums a
    column at a time (strided, 2-3x slower than a GEMM of the same size reads it)."""

    @staticmethod
    def forward(ctx, y: Tensor, b: Tensor) -> Tensor:
        # in y's dtype, as nn.Linear adds it: under bf16 autocast an fp32 bias made the
        # output (and the attention inputs after it) fp32 where eager's are bf16
        ctx.b_dtype = b.dtype
        return y + b.to(y.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        flat = g.flatten(0, -2)
        return g, (flat.new_ones((1, flat.shape[0])) @ flat).view(g.shape[-1]).to(ctx.b_dtype)


def per_token(m: Tensor, sel: tuple[Tensor, Tensor | None]) -> Tensor:
    """Per-sample rows ``m`` ``(n, k)`` for every token of a flat stream (the compiled blocks' form).

    ``sel`` is ``(seg, onehot)``: the token -> row index ``(L,)`` and, for few samples, the
    same map as a one-hot ``(L, n)`` matrix for the backward (None: a plain gather, whose
    backward scatter-adds; compiled.py decides).
    """
    seg, onehot = sel
    return m.index_select(0, seg) if onehot is None else _PerToken.apply(m, seg, onehot)


def pair_split_order(n_rows: int, n_heads: int, d_head: int, device) -> tuple[Tensor, Tensor]:
    """Row order of a q|k|rest projection that lists every q and k head's RoPE pairs
    ``(2i, 2i + 1)`` as halves, ``[0, 2, ..., D - 2, 1, 3, ..., D - 1]`` per head, and its inverse.

    The compiled blocks project q and k in this order (the weight rows gathered, the
    parameters untouched), so RoPE reads two contiguous halves, which inductor vectorises;
    the interleaved pairs compile to a scalar loop. Attention only sums ``q . k`` over each
    head's dimensions, so q and k permuted alike give the same scores and v (not
    permuted) the same output.
    """
    d, ar = n_heads * d_head, torch.arange(n_heads * d_head, device=device)
    split = ar.view(n_heads, d_head // 2, 2).transpose(1, 2).reshape(d)
    back = ar.view(n_heads, 2, d_head // 2).transpose(1, 2).reshape(d)
    rest = torch.arange(2 * d, n_rows, device=device)
    return torch.cat([split, d + split, rest]), torch.cat([back, d + back, rest])


def rope_split(x: Tensor, rot: Tensor) -> Tensor:
    """:func:`apply_rope` on heads in :func:`pair_split_order`, ``rot`` ``(L, 1, 2, D/2)``: cos, then sin.

    The same products as the complex multiply, in real arithmetic (inductor does not fuse
    complex tensors), so the compiled blocks fuse RoPE with the q/k norms around it.
    """
    x0, x1 = x.float().chunk(2, dim=-1)
    cos, sin = rot.unbind(-2)
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).to(x.dtype)


def qk_norm_split(norm: QKNorm, q: Tensor, k: Tensor, v: Tensor, order: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """:class:`QKNorm` on heads in :func:`pair_split_order` (``order``: as it returned it)."""
    head = tuple(o[: q.shape[-1]] for o in order)  # the first head's part: the norm scales' order
    return (rms_norm(q, relayout(norm.query_norm.scale, *head)).to(v.dtype),
            rms_norm(k, relayout(norm.key_norm.scale, *head)).to(v.dtype))


def gelu_tanh(x: Tensor) -> Tensor:
    """``GELU(approximate="tanh")`` as ``x * sigmoid(2 z)`` (= ``x/2 (1 + tanh z)``), the compiled blocks' form.

    Inductor's CPU code evaluates ``tanh`` with an accurate but slow vector routine (the
    eager kernel too): this form is the same function, within float rounding (< 1e-6 here),
    at a third of the cost forward and half backward.
    """
    return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


def linear(lin: nn.Linear, x: Tensor, rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``lin(x)``, the compiled blocks' form; ``rows``: an order of its output features and
    the inverse (the weight rows are gathered with :func:`relayout`: no scatter-add backward).

    The bias is added by :class:`_BiasAdd` (its gradient a GEMM). Inductor fuses the add
    back into an addmm, which measured faster than any form that kept it apart.
    """
    w, b = lin.weight, lin.bias
    if rows is not None:
        w, b = relayout(w, *rows), None if b is None else relayout(b, *rows)
    y = x @ w.t()
    return y if b is None else _BiasAdd.apply(y, b)


def _init_linear(lin: nn.Linear, zero: bool = False) -> None:
    if zero:
        nn.init.zeros_(lin.weight)
    else:
        nn.init.trunc_normal_(lin.weight, std=0.02)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class MLPEmbedder(nn.Module):
    def __init__(self, d_in: int, d_model: int):
        super().__init__()
        self.in_layer = nn.Linear(d_in, d_model)
        self.out_layer = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))

    def init_weights(self) -> None:
        _init_linear(self.in_layer)
        _init_linear(self.out_layer)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale)


def rms_norm(x: Tensor, scale: Tensor) -> Tensor:
    # Normalised in float32 even under bf16, scaled after the cast back (as BFL).
    return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype) * scale


class QKNorm(nn.Module):
    def __init__(self, d_head: int):
        super().__init__()
        self.query_norm = RMSNorm(d_head)
        self.key_norm = RMSNorm(d_head)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class Modulation(nn.Module):
    """``k`` per-token vectors (shift, scale, gate, ...) from the per-sample conditioning vector."""

    def __init__(self, d_model: int, k: int):
        super().__init__()
        self.k = k
        self.lin = nn.Linear(d_model, k * d_model)

    def forward(self, vec: Tensor, stream: Stream) -> tuple[Tensor, ...]:
        # One gather of all k vectors per token (a view when the stream is uniform).
        return stream.tok(self.lin(F.silu(vec))).chunk(self.k, dim=-1)

    def tokens(self, vec: Tensor, sel: tuple[Tensor, Tensor | None], start: int, stop: int) -> tuple[Tensor, ...]:
        """Vectors ``start .. stop - 1`` for every token of a flat stream (the compiled blocks' form).

        Only those are gathered: the backward sums per sample (a one-hot GEMM, see
        :func:`per_token`) over the vectors this half uses, not all ``k``.
        """
        d = self.lin.out_features // self.k
        return per_token(self.lin(F.silu(vec))[:, start * d : stop * d], sel).chunk(stop - start, dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, d_head: int, qkv_bias: bool):
        super().__init__()
        self.n_heads, self.d_head = d_model // d_head, d_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.norm = QKNorm(d_head)
        self.proj = nn.Linear(d_model, d_model)

    def qkv_heads(self, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, self.d_head)).unbind(-3)
        q, k = self.norm(q, k, v)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def qkv_heads_split(self, x: Tensor, rot: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`qkv_heads` for the compiled blocks: q and k in :func:`pair_split_order`."""
        H, D = self.n_heads, self.d_head
        order = pair_split_order(3 * H * D, H, D, x.device)
        q, k, v = linear(self.qkv, x, order).unflatten(-1, (3, H, D)).unbind(-3)
        q, k = qk_norm_split(self.norm, q, k, v, order)
        if rot is not None:
            q, k = rope_split(q, rot), rope_split(k, rot)
        return q, k, v


def mlp_split(mlp: nn.Sequential, x: Tensor) -> Tensor:
    """The MLP in the compiled blocks' form (:func:`linear`, :func:`gelu_tanh`)."""
    return linear(mlp[2], gelu_tanh(linear(mlp[0], x)))


def _mlp(d_model: int, d_mlp: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(approximate="tanh"), nn.Linear(d_mlp, d_model))


class DoubleStreamBlock(nn.Module):
    """Separate text / image weights and modulation; one joint attention over each sample."""

    def __init__(self, d_model: int, d_head: int, d_mlp: int, qkv_bias: bool):
        super().__init__()
        for s in ("img", "txt"):
            self.add_module(f"{s}_mod", Modulation(d_model, 6))
            self.add_module(f"{s}_norm1", _layer_norm(d_model))
            self.add_module(f"{s}_attn", SelfAttention(d_model, d_head, qkv_bias))
            self.add_module(f"{s}_norm2", _layer_norm(d_model))
            self.add_module(f"{s}_mlp", _mlp(d_model, d_mlp))

    #: Set by ``Flux`` from ``cfg.compile``: run the two compiled halves below (compiled.py).
    compiled = False

    def forward(self, txt: Tensor, img: Tensor, vec: Tensor, lay: Layout) -> tuple[Tensor, Tensor]:
        if self.compiled:
            from .compiled import double_block

            return double_block(self, txt, img, vec, lay)
        im, tm = self.img_mod(vec, lay.img), self.txt_mod(vec, lay.txt)
        # Text positions are zero: RoPE is the identity on text, so only the image rotates.
        qi, ki, vi = self.img_attn.qkv_heads(modulate(self.img_norm1(img), im[0], im[1]), lay.img_rope)
        qt, kt, vt = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), tm[0], tm[1]), None)
        out_t, out_i = lay.split(lay.attend(lay.merge(qt, qi), lay.merge(kt, ki), lay.merge(vt, vi)))
        img = img + im[2] * self.img_attn.proj(out_i)
        img = img + im[5] * self.img_mlp(modulate(self.img_norm2(img), im[3], im[4]))
        txt = txt + tm[2] * self.txt_attn.proj(out_t)
        txt = txt + tm[5] * self.txt_mlp(modulate(self.txt_norm2(txt), tm[3], tm[4]))
        return txt, img

    # The compiled form: everything before attention, then everything after it, on flat
    # streams with tensor-only arguments (lengths are never Python ints, so a new pack
    # length is a new size of the same graph, not a new graph). Same operations as
    # ``forward``; attention itself runs eagerly between the halves (see compiled.py).
    def attn_in(self, txt, img, vec, txt_sel, img_sel, img_rot, src, inv) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v in the attention backend's layout: row r is ``cat([txt, img, 0])[src[r]]``
        (``inv``: the row of every text-then-image token, src's inverse)."""
        im, tm = self.img_mod.tokens(vec, img_sel, 0, 2), self.txt_mod.tokens(vec, txt_sel, 0, 2)
        qi, ki, vi = self.img_attn.qkv_heads_split(modulate(self.img_norm1(img), im[0], im[1]), img_rot)
        qt, kt, vt = self.txt_attn.qkv_heads_split(modulate(self.txt_norm1(txt), tm[0], tm[1]), None)
        return tuple(relayout(torch.cat([t, i]), src, inv) for t, i in ((qt, qi), (kt, ki), (vt, vi)))

    def attn_out(self, txt, img, vec, attn, txt_sel, img_sel, src, inv) -> tuple[Tensor, Tensor]:
        """The rest of the block, reading the attention output back from the backend's layout."""
        # The modulation linears are recomputed here (n rows: nothing) rather than passed
        # as (L, 4 d) tensors between the halves.
        im, tm = self.img_mod.tokens(vec, img_sel, 2, 6), self.txt_mod.tokens(vec, txt_sel, 2, 6)
        out_t, out_i = relayout(attn, inv, src).split([txt.shape[0], img.shape[0]])
        img = img + im[0] * linear(self.img_attn.proj, out_i)
        img = img + im[3] * mlp_split(self.img_mlp, modulate(self.img_norm2(img), im[1], im[2]))
        txt = txt + tm[0] * linear(self.txt_attn.proj, out_t)
        txt = txt + tm[3] * mlp_split(self.txt_mlp, modulate(self.txt_norm2(txt), tm[1], tm[2]))
        return txt, img

    def init_weights(self) -> None:
        for s in ("img", "txt"):
            _init_linear(getattr(self, f"{s}_mod").lin, zero=True)
            attn = getattr(self, f"{s}_attn")
            _init_linear(attn.qkv)
            _init_linear(attn.proj)
            nn.init.ones_(attn.norm.query_norm.scale)
            nn.init.ones_(attn.norm.key_norm.scale)
            mlp = getattr(self, f"{s}_mlp")
            _init_linear(mlp[0])
            _init_linear(mlp[2])


class SingleStreamBlock(nn.Module):
    """Shared weights on the interleaved pack; attention and MLP in parallel (fused linears)."""

    def __init__(self, d_model: int, d_head: int, d_mlp: int):
        super().__init__()
        self.n_heads, self.d_head, self.d_model, self.d_mlp = d_model // d_head, d_head, d_model, d_mlp
        self.linear1 = nn.Linear(d_model, 3 * d_model + d_mlp)
        self.linear2 = nn.Linear(d_model + d_mlp, d_model)
        self.norm = QKNorm(d_head)
        self.pre_norm = _layer_norm(d_model)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(d_model, 3)

    #: Set by ``Flux`` from ``cfg.compile`` (see DoubleStreamBlock.compiled).
    compiled = False

    def forward(self, x: Tensor, vec: Tensor, lay: Layout) -> Tensor:
        if self.compiled:
            from .compiled import single_block

            return single_block(self, x, vec, lay)
        S: Stream = lay.all
        shift, scale, gate = self.modulation(vec, S)
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * self.d_model, self.d_mlp], dim=-1
        )
        q, k, v = qkv.unflatten(-1, (3, self.n_heads, self.d_head)).unbind(-3)
        q, k = self.norm(q, k, v)
        q, k = apply_rope(q, lay.all_rope), apply_rope(k, lay.all_rope)
        attn = S.group(lay.attend(S.flat(q), S.flat(k), S.flat(v)))
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1))

    # Compiled halves on the flat pack (see DoubleStreamBlock.attn_in).
    def attn_in(self, x, vec, sel, rot, src, inv) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        shift, scale = self.modulation.tokens(vec, sel, 0, 2)
        H, D = self.n_heads, self.d_head
        order = pair_split_order(3 * self.d_model + self.d_mlp, H, D, x.device)
        h = modulate(self.pre_norm(x), shift, scale)
        qkv, mlp = linear(self.linear1, h, order).split([3 * self.d_model, self.d_mlp], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, H, D)).unbind(-3)
        q, k = qk_norm_split(self.norm, q, k, v, order)
        q, k = rope_split(q, rot), rope_split(k, rot)
        return relayout(q, src, inv), relayout(k, src, inv), relayout(v, src, inv), gelu_tanh(mlp)

    def attn_out(self, x, vec, attn, mlp, sel, src, inv) -> Tensor:
        (gate,) = self.modulation.tokens(vec, sel, 2, 3)
        # linear2 of cat([attn, mlp]) as two GEMMs over its column blocks: no concatenated copy.
        w_attn, w_mlp = self.linear2.weight.split([self.d_model, self.d_mlp], dim=1)
        out = relayout(attn, inv, src) @ w_attn.t() + mlp @ w_mlp.t()
        return x + gate * _BiasAdd.apply(out, self.linear2.bias)

    def init_weights(self) -> None:
        _init_linear(self.linear1)
        _init_linear(self.linear2)
        _init_linear(self.modulation.lin, zero=True)
        nn.init.ones_(self.norm.query_norm.scale)
        nn.init.ones_(self.norm.key_norm.scale)


class LastLayer(nn.Module):
    def __init__(self, d_model: int, d_out: int):
        super().__init__()
        self.norm_final = _layer_norm(d_model)
        self.linear = nn.Linear(d_model, d_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))

    def forward(self, img: Tensor, vec: Tensor, stream: Stream) -> Tensor:
        """Grouped image tokens -> flat ``(L_img, d_out)``.

        Flattened before the projection so that the model's output is a fresh tensor, not a
        view (FSDP2 hooks its backward on the root module's output and warns about views).
        """
        shift, scale = stream.tok(self.adaLN_modulation(vec)).chunk(2, dim=-1)  # one gather for both
        return self.linear(stream.flat(modulate(self.norm_final(img), shift, scale)))

    def init_weights(self) -> None:
        _init_linear(self.adaLN_modulation[1], zero=True)
        _init_linear(self.linear, zero=True)
