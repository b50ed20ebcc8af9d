"""Weight formats: the native (BFL) layout, diffusers' FluxTransformer2DModel layout,
and checked loading.

The native state dict uses Black Forest Labs' key names, so ``flux1-dev.safetensors``
loads as is. The adapter renames, splits fused projections (BFL ``qkv`` and
``linear1``) and swaps the final layer's (shift, scale) halves, both ways.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from minfm_core.errors import MinfmError
from minfm_core.safepath import contained
from minfm_core.weights import (check_finite, check_keys, first_names, has_weights, load_safetensors_file,
                                   read_safetensors)

_BFL_PREFIX = "model.diffusion_model."

# (BFL name, diffusers name(s)) per linear layer: weight and bias. Several diffusers
# names: BFL fuses them along dim 0 (q, k, v [, mlp-in] of d_model rows each, the last
# taking the rest).
_TOP = [
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
]
_DOUBLE = [
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
]
_SINGLE = [
    ("modulation.lin", "norm.linear"),
    ("linear2", "proj_out"),
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
]
# QK-norm scales: single tensors, full names.
_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]
# BFL's final modulation is (shift, scale); diffusers' norm_out is (scale, shift).
_SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _count(sd: dict, prefix: str, what: str) -> int:
    """How many blocks ``prefix<i>.`` keys number: their indices must be 0..n-1. Checked before
    the rules are built from n: a hostile file's one key ``transformer_blocks.100000000.x``
    made them a hundred million blocks' worth (gigabytes before any key was compared)."""
    ids = set()
    for k in sd:
        if k.startswith(prefix):
            index = k[len(prefix):].split(".", 1)[0]
            if not (index.isascii() and index.isdigit()):
                raise MinfmError(f"{what}: unexpected key {k!r} (no block index)")
            ids.add(int(index[:12]))  # (a thousand digits are refused below, never parsed whole)
    if ids != set(range(len(ids))):
        gaps = sorted(set(range(max(ids) + 1)) - ids) if max(ids) < 10 * len(ids) else []
        raise MinfmError(f"{what}: {prefix}<i> blocks are not numbered 0, 1, 2, ..."
                         + (f" (missing {first_names(map(str, gaps))})" if gaps
                            else f" (there is a {prefix}{max(ids)} among {len(ids)} blocks)"))
    return len(ids)


def _rules(n_double: int, n_single: int) -> list[tuple[str, tuple[str, ...]]]:
    """Every (BFL key, diffusers keys) pair of a model with this many blocks."""
    rules = []

    def add(table, a: str = "", b: str = "", params=("weight", "bias")) -> None:
        for x, ys in table:
            ys = (ys,) if isinstance(ys, str) else ys
            for w in params:
                dot = f".{w}" if w else ""
                rules.append((f"{a}{x}{dot}", tuple(f"{b}{y}{dot}" for y in ys)))

    add(_TOP + [_SWAPPED])
    for i in range(n_double):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        add(_DOUBLE, a, b)
        add(_DOUBLE_NORMS, a, b, params=("",))
    for i in range(n_single):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        add(_SINGLE, a, b)
        add(_SINGLE_NORMS, a, b, params=("",))
    return rules


def _swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def is_diffusers(sd: dict) -> bool:
    return "x_embedder.weight" in sd


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``model.diffusion_model.`` prefix some BFL-format checkpoints carry."""
    return {k.removeprefix(_BFL_PREFIX): v for k, v in sd.items()}


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Native (BFL) state dict -> diffusers ``FluxTransformer2DModel`` state dict."""
    src, out = dict(strip_prefix(sd)), {}
    d_model = src["img_in.weight"].shape[0]
    what = "not a FLUX state dict in BFL layout"
    for a, bs in _rules(_count(src, "double_blocks.", what), _count(src, "single_blocks.", what)):
        if a not in src:  # optional: guidance embedding, q/k/v biases
            continue
        x = src.pop(a)
        if a.startswith(_SWAPPED[0]):
            x = _swap_halves(x)
        sizes = [d_model] * (len(bs) - 1) + [x.shape[0] - d_model * (len(bs) - 1)]
        out.update(zip(bs, x.split(sizes, dim=0)))
    if src:
        raise MinfmError(f"not a FLUX state dict in BFL layout: unexpected keys {first_names(src)}")
    return out


def diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``FluxTransformer2DModel`` state dict -> native (BFL) state dict."""
    src, out, missing = dict(sd), {}, []
    what = "not a FluxTransformer2DModel state dict"
    for a, bs in _rules(_count(src, "transformer_blocks.", what), _count(src, "single_transformer_blocks.", what)):
        present = [b for b in bs if b in src]
        if not present:  # optional: guidance embedding, q/k/v biases
            continue
        if len(present) < len(bs):  # a fused BFL tensor needs every part (to_q and to_k, not one)
            missing += [b for b in bs if b not in src]
            continue
        x = torch.cat([src.pop(b) for b in bs])
        out[a] = _swap_halves(x) if a.startswith(_SWAPPED[0]) else x
    if missing:
        raise MinfmError(f"{what}: missing keys {first_names(missing)}")
    if src:
        raise MinfmError(f"{what}: unexpected keys {first_names(src)}")
    return out


def diffusers_config(cfg) -> dict:
    """``config.json`` of the diffusers model equal to ``cfg`` (refuses what diffusers cannot express)."""
    problems = []
    if cfg.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio {cfg.mlp_ratio} (diffusers fixes 4.0)")
    if not cfg.qkv_bias:
        problems.append("qkv_bias false (diffusers always has q/k/v biases)")
    if cfg.rope_theta != 10_000:
        problems.append(f"rope_theta {cfg.rope_theta} (diffusers fixes 10000)")
    if problems:
        raise MinfmError("this FLUX config has no diffusers equivalent: " + "; ".join(problems))
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": cfg.d_img,
        "out_channels": None,
        "num_layers": cfg.n_ds_blocks,
        "num_single_layers": cfg.n_ss_blocks,
        "attention_head_dim": cfg.d_head,
        "num_attention_heads": cfg.n_heads,
        "joint_attention_dim": cfg.d_txt,
        "pooled_projection_dim": cfg.d_vec,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.rope_axes),
    }


def check_state_dict(model: torch.nn.Module, sd: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Raise one MinfmError naming every missing key, unexpected key and shape mismatch."""
    check_keys(model, sd, f"{source} (FLUX model as configured)")


def check_pretrained(model: torch.nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """:func:`check_state_dict` (keys, shapes, and floating-point where the model is: an int or
    bool tensor was cast silently) and every tensor finite (a diverged run's weights: training
    from them skips every step)."""
    check_state_dict(model, sd, source=source)
    check_finite(sd, source)


def _bfl_file(path: Path) -> Path:
    """The one BFL-layout file of a folder (``flux1-*.safetensors``, else the only one); a
    symlink leading out of the folder is refused (a cloned or downloaded folder is not ours)."""
    files = sorted(path.glob("flux1-*.safetensors")) or sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return contained(path, files[0].name, what=str(files[0]))
    if not files:
        raise MinfmError(f"{path}: no .safetensors weights found")
    raise MinfmError(f"{path}: several .safetensors files, name one: {', '.join(f.name for f in files)}")


def read_state_dict(ref: str) -> dict[str, Tensor]:
    """Native (BFL) state dict from a file, a folder (BFL or diffusers layout) or a Hub id."""
    path = Path(os.path.expanduser(ref))
    if not path.exists():
        from minfm_core.pretrained import resolve_pretrained

        from .config import flux_source

        path = resolve_pretrained(flux_source(ref))
    diffusers = [f for f in (path, path / "transformer") if path.is_dir() and has_weights(f, "diffusion_pytorch_model")]
    if diffusers:  # one file or the shards of its index (never a variant such as .fp16)
        # (a transformer/ that is a symlink out of the folder is refused, as any file's link)
        folder = diffusers[0] if diffusers[0] == path else contained(path, "transformer", what=str(diffusers[0]))
        sd = read_safetensors(folder, "diffusion_pytorch_model")
    else:
        sd = load_safetensors_file(_bfl_file(path) if path.is_dir() else path)
    sd = strip_prefix(sd)
    return diffusers_to_bfl(sd) if is_diffusers(sd) else sd


def load_pretrained(model: torch.nn.Module, ref: str, device=None, dtype: torch.dtype | None = None) -> None:
    """Load ``ref`` into ``model`` (typically built on meta) after checking every key and shape.

    Tensors are cast to ``dtype`` (None: torch's default dtype) on ``device``, one at a time
    (the memory-mapped original of each is dropped as soon as its copy exists).
    """
    sd = read_state_dict(ref)
    check_pretrained(model, sd, ref)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    for k in list(sd):
        sd[k] = sd[k].to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
