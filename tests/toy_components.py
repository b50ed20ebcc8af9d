"""Toy components for core tests: a registry independent of the built-in plugins.

Core tests resolve recipes against this registry so that their golden error texts do
not change when built-in plugins gain components.
"""

from __future__ import annotations

from typing import Literal

import attrs

from minfm_core.config import config, field
from minfm_core.registry import KINDS, Registry


@config
class ToyDenoiserConfig:
    """A toy denoiser config exposing the attributes the core cross-checks."""

    d_img: int = field(64, doc="input token width")
    d_head: int = field(64, doc="attention head width")
    rope_axes: tuple[int, ...] = field((8, 28, 28), doc="RoPE dims per (t, y, x)")
    act: Literal["gelu", "silu"] = field("gelu", doc="activation")


@config
class ToyVaeConfig:
    """A toy VAE."""

    latent_channels: int = field(16, doc="latent channels")
    compression: tuple[int, int, int] = field((1, 8, 8), doc="(frames, height, width) per latent cell")


@config
class ToyPatchConfig:
    """A toy patchifier."""

    patch_size: tuple[int, int, int] = field((1, 2, 2), doc="patch (f, h, w)")


@config
class ToyLogitNormalConfig:
    """A toy logit-normal sampler."""

    mu: float = field(0.0, doc="mean")
    sigma: float = field(1.0, doc="std", validator=attrs.validators.gt(0))


@config
class ToyShardConfig:
    """A toy parallelizer."""

    shard_size: int = field(1, doc="ranks per shard group")


def _factory(cfg=None, **kwargs):
    return ("built", cfg, kwargs)


DEFAULTS = {
    "denoiser": [("flux", ToyDenoiserConfig)],
    "vae": [("identity", ToyVaeConfig)],
    "patchifier": [("patch3d", ToyPatchConfig)],
    "attention": [("auto", None)],
    "path": [("rectified", None)],
    "time_sampler": [("logit_normal", ToyLogitNormalConfig), ("uniform", None)],
    "time_warper": [("none", None)],
    "time_weighter": [("uniform", None)],
    "sampler": [("euler", None)],
    "guidance": [("cfg", None)],
    "parallelizer": [("none", None), ("fsdp2", ToyShardConfig)],
    "balancer": [("none", None)],
    "logger": [("console", None), ("jsonl", None)],
    "dataset": [("shapes", None)],
}


def toy_registry() -> Registry:
    reg = Registry()
    for kind, items in DEFAULTS.items():
        assert kind in KINDS
        for name, cfg in items:
            reg.registrar(kind, "toy")(name, _factory, cfg)
    return reg
