"""The FLUX denoiser on packed, interleaved text+image sequences (no padding).

``forward`` embeds both streams, runs the double-stream blocks on separate text and
image streams (joint attention over each sample's interleaved tokens), interleaves
once, runs the single-stream blocks, and returns the image tokens' velocity
``v = eps - x0`` (FLUX convention, t = 1 is noise).

With a sequence balancer (``build_flux(..., balancer=...)``, the recipe's
``[balancer]``), the embedded ``[text_i, image_i]`` sequences are routed to other
ranks just before the blocks and the outputs routed back after the final layer; see
:meth:`Flux._forward_balanced` and docs/balancer.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from minfm_core.errors import MinfmError
from minfm_core.packing import interleave, interleave_index

from .config import FluxConfig
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, _init_linear, timestep_embedding
from .layout import Layout


class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig, attention, balancer=None):
        super().__init__()
        if sum(cfg.rope_axes) != cfg.d_head:
            raise MinfmError(f"model.denoiser.rope_axes: sum {sum(cfg.rope_axes)} must equal d_head = {cfg.d_head}")
        self.cfg = cfg
        self.attention = attention
        # None or the 'none' balancer: forward is the plain path, nothing added.
        self.balancer = None if balancer is None or balancer.identity else balancer
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
        for block in self.blocks:  # each block's arithmetic compiled (plugins/flux/compiled.py)
            block.compiled = bool(cfg.compile)

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
        _init_linear(self.img_in)
        _init_linear(self.txt_in)
        for emb in (self.time_in, self.vector_in, self.guidance_in):
            if emb is not None:
                emb.init_weights()
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()

    def pretrained_state_dict(self) -> dict[str, Tensor] | None:
        """``cfg.pretrained``'s native state dict, checked against this model; None without one.

        The tensors are memory-mapped from the safetensors files in their stored dtype, so
        a sharded build reads each rank's slices without ever holding the whole model in
        memory (``minfm_core.engine.pipeline.sharded_denoiser``). Works on a meta model.
        """
        if not self.cfg.pretrained:
            return None
        from .state_dict import check_pretrained, read_state_dict

        sd = read_state_dict(self.cfg.pretrained)
        check_pretrained(self, sd, self.cfg.pretrained)
        return sd

    def condition(self, t: Tensor, vec: Tensor | None, guidance: Tensor | None) -> Tensor:
        """The per-sample conditioning vector ``(n, d_model)`` that drives all modulation."""
        dtype = self.img_in.weight.dtype
        c = self.time_in(timestep_embedding(t).to(dtype))
        if self.guidance_in is not None and guidance is not None:
            c = c + self.guidance_in(timestep_embedding(guidance).to(dtype))
        if vec is not None:
            c = c + self.vector_in(vec.to(dtype))
        return c

    def layout(
        self, txt_lens: Tensor, img_lens: Tensor, img_pos: Tensor, rows: Tensor | None = None, attention=None
    ) -> Layout:
        attention = self.attention if attention is None else attention
        return Layout(txt_lens, img_lens, img_pos, self.cfg.rope_axes, self.cfg.rope_theta, attention, rows)

    def run_blocks(self, txt: Tensor, img: Tensor, cond: Tensor, lay: Layout) -> Tensor:
        """All blocks on embedded streams (grouped as ``lay`` says); returns image tokens (grouped).

        A sequence balancer that re-routes samples wraps this call with its own layout.
        """
        if self.blocks[0].compiled:  # set from cfg.compile in __init__
            # Compiled blocks take and return flat streams (plugins/flux/compiled.py): no
            # block output is a view (FSDP2 hooks its backward on each block's output).
            txt, img = lay.txt.flat(txt), lay.img.flat(img)
            for block in self.double_blocks:
                txt, img = block(txt, img, cond, lay)
            x = lay.merge_flat(txt, img)
            for block in self.single_blocks:
                x = block(x, cond, lay)
            return lay.img.group(x.index_select(0, lay.img_index))
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
        if self.balancer is not None:
            return self._forward_balanced(img, img_pos, img_lens, txt, txt_lens, t, vec, guidance)
        dtype = self.img_in.weight.dtype
        cond = self.condition(t, vec, guidance)
        lay = self.layout(txt_lens, img_lens, img_pos)
        h_img = lay.img.group(self.img_in(img.to(dtype)))
        h_txt = lay.txt.group(self.txt_in(txt.to(dtype)))
        out = self.final_layer(self.run_blocks(h_txt, h_img, cond, lay), cond, lay.img)
        return out.to(img.dtype)

    def _forward_balanced(self, img, img_pos, img_lens, txt, txt_lens, t, vec, guidance) -> Tensor:
        """``forward`` with the blocks and the final layer on the balancer's ranks.

        Each sample's embedded ``[text, image]`` sequence is routed (with its positions) as
        the plan says; a rank may then hold whole samples or, in a multi-GPU bag, one
        contiguous chunk of each (text first, so a chunk may hold no text). Every chunk is
        modulated by its sample's conditioning vector, computed here from the gathered
        per-sample inputs of the samples present (the same vector the source would compute;
        no collective in backward, so ``t``, ``vec``, ``guidance`` get no gradient: they are
        data from frozen encoders and the time sampler). Attention goes through the balancer's
        wrapper of the backend (Ulysses in multi-GPU bags). Empty streams still run every
        layer on zero rows, so every parameter gets a (zero) gradient on every rank.
        """
        bal, dtype = self.balancer, self.img_in.weight.dtype
        packed, seq_lens, _, img_index = interleave(
            self.txt_in(txt.to(dtype)), txt_lens, self.img_in(img.to(dtype)), img_lens
        )
        pos = img_pos.new_zeros((packed.shape[0], img_pos.shape[1])).index_copy(0, img_index, img_pos)  # text at 0
        x, chunk_lens, (pos,), handle = bal.route(packed, seq_lens, [pos])
        per_sample = [t, txt_lens] + [v for v in (vec, guidance) if v is not None]
        if any(v.requires_grad for v in per_sample):
            raise MinfmError(
                "a balanced FLUX forward takes t, vec and guidance without gradient (they are gathered as data)"
            )
        gathered = bal.gather_samples(per_sample, handle)
        g_t, g_txt = gathered[0], gathered[1]
        g_vec = gathered[2] if vec is not None else None
        g_guid = gathered[-1] if guidance is not None else None
        dev = x.device
        samples = torch.from_numpy(handle.samples.copy()).to(dev)
        offsets = torch.from_numpy(handle.offsets.copy()).to(dev)
        present, rows = torch.unique_consecutive(samples, return_inverse=True)  # chunks come in sample order
        cond = self.condition(
            g_t[present], None if g_vec is None else g_vec[present], None if g_guid is None else g_guid[present]
        )
        c_txt = torch.minimum((g_txt.to(dev)[samples] - offsets).clamp(min=0), chunk_lens.long())
        c_img = chunk_lens.long() - c_txt
        _, c_img_index = interleave_index(c_txt, c_img)
        lay = self.layout(c_txt, c_img, pos[c_img_index], rows=rows, attention=bal.attention(self.attention, handle))
        h = self.run_blocks(*lay.split(x), cond, lay)
        out = self.final_layer(h, cond, lay.img)
        # Back in one exchange of d_img-wide rows (text rows are zeros), then the image rows.
        rows_out = out.new_zeros((x.shape[0], out.shape[1])).index_copy(0, lay.img_index, out)
        return bal.reverse(rows_out, handle).index_select(0, img_index).to(img.dtype)


def build_flux(cfg: FluxConfig, *, load_weights: bool = True, attention=None, balancer=None) -> Flux:
    """The registered ``flux`` denoiser factory.

    ``load_weights=False`` only builds the structure on the default device (no files read,
    no init; under ``torch.device("meta")`` no memory either). Otherwise the weights come from
    ``cfg.pretrained`` (checked key by key) or from :meth:`Flux.init_weights`.
    ``balancer``: a built sequence balancer (the engine passes the recipe's
    ``[balancer]`` when it is not ``none``); None keeps the plain forward.
    """
    if attention is None:
        from minfm_core.registry import get_registry

        attention = get_registry().get("attention", "auto").build()
    if not load_weights:
        return Flux(cfg, attention, balancer)
    if cfg.pretrained:
        from .state_dict import load_pretrained

        device = torch.get_default_device()
        with torch.device("meta"):
            model = Flux(cfg, attention, balancer)
        load_pretrained(model, cfg.pretrained, device=device)
        return model
    model = Flux(cfg, attention, balancer)
    if model.img_in.weight.device.type != "meta":
        model.init_weights()
    return model
