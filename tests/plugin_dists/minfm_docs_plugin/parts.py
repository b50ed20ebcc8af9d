"""The torch side of the plugin, imported only when a recipe builds one of its components."""

import json
import math
from pathlib import Path

import torch

from minfm_core import packing, protocols
from minfm_core.registry import get_registry


class ArcsineSampler:
    def __init__(self, cfg):
        self.eps = cfg.eps

    def __call__(self, n, *, generator=None, device=None):
        u = torch.rand(n, generator=generator)
        return (torch.sin(math.pi * u / 2) ** 2).clamp(self.eps, 1 - self.eps).to(device)


class MlpDenoiser(torch.nn.Module, protocols.Denoiser):
    """Per token: [image token, t, the sample's mean text token, its pooled vector] -> velocity,
    with one attention layer inside each sample. The balancer, if any, moves whole samples
    (or chunks of them) between ranks around the layers."""

    def __init__(self, cfg, attention, balancer):
        super().__init__()
        self.cfg = cfg
        self.attention = attention
        self.balancer = None if balancer is None or balancer.identity else balancer
        self.inp = torch.nn.Linear(cfg.d_img + 1 + cfg.d_txt + cfg.d_vec, cfg.d_model)
        self.qkv = torch.nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = torch.nn.Linear(cfg.d_model, cfg.d_img)

    def init_weights(self):
        for layer in (self.inp, self.qkv, self.out):
            torch.nn.init.xavier_uniform_(layer.weight)
            torch.nn.init.zeros_(layer.bias)

    def forward(self, img, img_pos, img_lens, txt, txt_lens, t, vec=None, guidance=None):
        cfg = self.cfg
        vec = vec if vec is not None else img.new_zeros((img_lens.numel(), cfg.d_vec))
        cond = torch.cat([t[:, None].to(img.dtype), packing.segment_mean(txt, txt_lens).to(img.dtype), vec], -1)
        x = self.inp(torch.cat([img, packing.expand_per_token(cond, img_lens)], -1))
        lens, attention, handle = img_lens, self.attention, None
        if self.balancer is not None:
            x, lens, _, handle = self.balancer.route(x, img_lens, [])
            attention = self.balancer.attention(self.attention, handle)
        heads = cfg.d_model // cfg.d_head
        q, k, v = self.qkv(x).reshape(x.shape[0], 3, heads, cfg.d_head).unbind(1)
        max_len = int(lens.max()) if lens.numel() else 0
        a = attention(q, k, v, packing.cu_seqlens(lens), max_len).reshape(x.shape[0], cfg.d_model)
        h = self.out(torch.nn.functional.gelu(x + a))
        if handle is not None:
            h = self.balancer.reverse(h, handle)
        return h


def build_denoiser(cfg, *, load_weights=True, attention=None, balancer=None):
    if attention is None:
        attention = get_registry().get("attention", "auto").build()
    model = MlpDenoiser(cfg, attention, balancer)
    if load_weights:
        model.init_weights()
    return model


class CsvLogger(protocols.Logger):
    """Only rank 0 writes; ``set_total`` comes from the protocol's default (nothing)."""

    def __init__(self, cfg, *, run_dir, rank=0, recipe=None):
        self.path = Path(run_dir) / cfg.filename if rank == 0 else None
        self.images = 0

    def log(self, step, metrics):
        if self.path is not None and "loss" in metrics:
            with self.path.open("a") as f:
                f.write(f"{step},{float(metrics['loss'])}\n")

    def log_images(self, step, name, images, captions):
        self.images += len(images)

    def close(self):
        if self.path is not None:
            with self.path.with_suffix(".done").open("w") as f:
                json.dump({"images": self.images}, f)
