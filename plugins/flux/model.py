"""The FLUX denoiser on packed, interleaved text+image sequences (no padding).

``forward`` embeds both streams, runs the double-stream blocks on separate text and
image streams (joint attention over each sample's interleaved tokens), interleaves
once, runs the single-stream blocks, and returns the image tokens' velocity
``v = eps - x0`` (FLUX convention, t = 1 is noise).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from minfm_core.errors import MinfmError

from .config import FluxConfig
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
from .layout import Layout


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig, attention):
        super().__init__()
        if sum(cfg.rope_axes) != cfg.d_head:
            raise MinfmError(f"model.denoiser.rope_axes: sum {sum(cfg.rope_axes)} must equal d_head = {cfg.d_head}")
        self.cfg = cfg
        self.attention = attention
        d = cfg.d_model
        self.img_in = nn.Linear(cfg.d_img, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(cfg.d_vec, d)
        self.guidance_in = MLPEmbedder(256, d) if cfg.guidance_embed else None
        self.txt_in = nn.Linear(cfg.d_txt, d)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, cfg.d_head, cfg.d_mlp, cfg.qkv_bias) for _ in range(cfg.n_ds_blocks)
        )
        self.single_blocks = nn.ModuleList(SingleStreamBlock(d, cfg.d_head, cfg.d_mlp) for _ in range(cfg.n_ss_blocks))
        self.final_layer = LastLayer(d, cfg.d_img)

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block in order (FSDP units, activation checkpointing)."""
        return [*self.double_blocks, *self.single_blocks]

    @torch.no_grad()
    def init_weights(self) -> None:
        """The seed's initialisation; modulation and the output projection start at zero.

        Separate from ``__init__`` so a parallelizer can build on the meta device, shard,
        ``to_empty`` and then initialise.
        """
        nn.init.trunc_normal_(self.img_in.weight, std=0.02)
        nn.init.zeros_(self.img_in.bias)
        nn.init.trunc_normal_(self.txt_in.weight, std=0.02)
        nn.init.zeros_(self.txt_in.bias)
        for emb in (self.time_in, self.vector_in, self.guidance_in):
            if emb is not None:
                emb.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()

    def condition(self, t: Tensor, vec: Tensor | None, guidance: Tensor | None) -> Tensor:
        """The per-sample conditioning vector ``(n, d_model)`` that drives all modulation."""
        dtype = self.img_in.weight.dtype
        c = self.time_in(timestep_embedding(t).to(dtype))
        if self.guidance_in is not None and guidance is not None:
            c = c + self.guidance_in(timestep_embedding(guidance).to(dtype))
        if vec is not None:
            c = c + self.vector_in(vec.to(dtype))
        return c

    def layout(self, txt_lens: Tensor, img_lens: Tensor, img_pos: Tensor, rows: Tensor | None = None) -> Layout:
        return Layout(txt_lens, img_lens, img_pos, self.cfg.rope_axes, self.cfg.rope_theta, self.attention, rows)

    def run_blocks(self, txt: Tensor, img: Tensor, cond: Tensor, lay: Layout) -> Tensor:
        """All blocks on embedded streams (grouped as ``lay`` says); returns image tokens (grouped).

        A sequence balancer that re-routes samples wraps this call with its own layout.
        """
        for block in self.double_blocks:
            txt, img = block(txt, img, cond, lay)
        x = lay.all.group(lay.merge(txt, img))
        for block in self.single_blocks:
            x = block(x, cond, lay)
        return lay.split(lay.all.flat(x))[1]

    def forward(
        self,
        img: Tensor,
        img_pos: Tensor,
        img_lens: Tensor,
        txt: Tensor,
        txt_lens: Tensor,
        t: Tensor,
        vec: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity ``(L_img, d_img)`` for packed image tokens ``(L_img, d_img)``.

        ``img_pos`` ``(L_img, 3)`` (t, y, x); ``txt`` ``(L_txt, d_txt)`` sits at position 0;
        ``t``, ``guidance`` ``(n,)``; ``vec`` ``(n, d_vec)`` pooled conditioning (None: omitted);
        ``guidance`` is used only when the model has a guidance embedding.
        """
        dtype = self.img_in.weight.dtype
        cond = self.condition(t, vec, guidance)
        lay = self.layout(txt_lens, img_lens, img_pos)
        h_img = lay.img.group(self.img_in(img.to(dtype)))
        h_txt = lay.txt.group(self.txt_in(txt.to(dtype)))
        out = self.final_layer(self.run_blocks(h_txt, h_img, cond, lay), cond, lay.img)
        return lay.img.flat(out).to(img.dtype)


def build_flux(cfg: FluxConfig, *, load_weights: bool = True, attention=None) -> Flux:
    """The registered ``flux`` denoiser factory.

    ``load_weights=False`` only builds the structure (on the meta device under
    ``torch.device("meta")``: no memory, no files). Otherwise the weights come from
    ``cfg.pretrained`` (checked key by key) or from :meth:`Flux.init_weights`.
    """
    if attention is None:
        from minfm_core.registry import get_registry

        attention = get_registry().get("attention", "auto").build()
    if not load_weights:
        return Flux(cfg, attention)
    if cfg.pretrained:
        from .state_dict import load_pretrained

        device = torch.get_default_device()
        with torch.device("meta"):
            model = Flux(cfg, attention)
        load_pretrained(model, cfg.pretrained, device=device)
        return model
    model = Flux(cfg, attention)
    if model.img_in.weight.device.type != "meta":
        model.init_weights()
    return model
