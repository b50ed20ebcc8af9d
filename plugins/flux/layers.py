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
        # Normalised in float32 even under bf16, scaled after the cast back (as BFL).
        return F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype) * self.scale


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

    def forward(self, txt: Tensor, img: Tensor, vec: Tensor, lay: Layout) -> tuple[Tensor, Tensor]:
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

    def forward(self, x: Tensor, vec: Tensor, lay: Layout) -> Tensor:
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
