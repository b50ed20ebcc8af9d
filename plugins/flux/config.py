"""The FLUX denoiser's config and its named flavors (no torch import here).

A recipe names a ``flavor`` and may override any field; a field left unset (None)
takes the flavor's value. After construction every field holds its effective value,
so ``cfg.d_img``, ``cfg.d_head``, ``cfg.rope_axes``, ... are always plain values (the
core's cross-checks read them) and the resolved recipe written to a run directory
spells out every dimension. Without a flavor every dimension must be given.
"""

from __future__ import annotations

from typing import Literal

import attrs

from minfm_core.config import config, field
from minfm_core.pretrained import is_local, parse_hub_ref
from minfm_core.validators import MAX_DEPTH, MAX_WIDTH, Range

#: The file a Hub repo's root stands for (black-forest-labs' FLUX.1 repos hold it at the top).
BFL_FILE = "flux1-dev.safetensors"


def flux_source(pretrained: str) -> str:
    """A Hub repo root means its ``flux1-dev.safetensors`` (not the whole repo: FLUX.1-dev's
    holds the VAE, both text encoders and a diffusers copy besides); a reference with a path
    in the repo, a file or a folder, and a local path are taken as they are."""
    hub = None if is_local(pretrained) else parse_hub_ref(pretrained)
    return f"{pretrained}/{BFL_FILE}" if hub is not None and not hub.subpath else pretrained


#: Flavor name -> the value of every model field (parameter counts are pinned by tests).
FLAVORS: dict[str, dict] = {
    # A few hundred thousand parameters: unit tests and smoke runs.
    "flux-debug": dict(
        d_model=128, d_head=32, n_ds_blocks=2, n_ss_blocks=2, d_txt=64, d_vec=32, d_img=64,
        rope_axes=(8, 12, 12), rope_theta=10_000, guidance_embed=False, mlp_ratio=4.0, qkv_bias=True,
    ),
    # The seed's ImageNet model: 560,246,848 parameters.
    "flux-tiny": dict(
        d_model=1024, d_head=64, n_ds_blocks=8, n_ss_blocks=16, d_txt=768, d_vec=768, d_img=64,
        rope_axes=(8, 28, 28), rope_theta=10_000, guidance_embed=False, mlp_ratio=4.0, qkv_bias=True,
    ),
    # FLUX.1 [dev]: 11,901,408,320 parameters; loads black-forest-labs' flux1-dev.safetensors.
    "flux-dev": dict(
        d_model=3072, d_head=128, n_ds_blocks=19, n_ss_blocks=38, d_txt=4096, d_vec=768, d_img=64,
        rope_axes=(16, 56, 56), rope_theta=10_000, guidance_embed=True, mlp_ratio=4.0, qkv_bias=True,
    ),
}

# None (unset: the flavor's value) passes every range.
WIDTH = Range(1, MAX_WIDTH)
DEPTH = Range(0, MAX_DEPTH)


@config
class FluxConfig:
    """FLUX MMDiT on packed text+image sequences (double- then single-stream blocks)."""

    flavor: Literal["flux-debug", "flux-tiny", "flux-dev"] | None = field(
        None, doc="named defaults for every field left unset (flux-debug, flux-tiny, flux-dev)"
    )
    d_model: int | None = field(None, doc="hidden width (heads = d_model / d_head)", validator=WIDTH)
    d_head: int | None = field(None, doc="width of one attention head", validator=WIDTH)
    n_ds_blocks: int | None = field(None, doc="double-stream blocks (separate text/image weights)", validator=DEPTH)
    n_ss_blocks: int | None = field(
        None, doc="single-stream blocks (shared weights, fused linear1/linear2)", validator=DEPTH
    )
    d_txt: int | None = field(None, doc="width of the text encoder's token embeddings", validator=WIDTH)
    d_vec: int | None = field(None, doc="width of the pooled conditioning vector (CLIP / class embedding)", validator=WIDTH)
    d_img: int | None = field(None, doc="width of one image token = latent channels x patch volume", validator=WIDTH)
    rope_axes: tuple[int, ...] | None = field(
        None, doc="RoPE dims per position axis (t, y, x); sum = d_head, each even", validator=WIDTH
    )
    rope_theta: int | None = field(None, doc="RoPE base frequency (FLUX: 10,000)", validator=Range(1, 10**9))
    guidance_embed: bool | None = field(None, doc="add a distilled-guidance embedding (FLUX.1-dev)")
    mlp_ratio: float | None = field(None, doc="MLP hidden width / d_model", validator=Range(0, 64, lo_open=True))
    qkv_bias: bool | None = field(None, doc="bias in the q/k/v projections")
    pretrained: str | None = field(
        None, doc="weights to load: a BFL .safetensors file, a folder holding one (or a diffusers transformer), or a Hub id",
        file="ref",
    )
    compile: bool = field(
        False, doc="torch.compile each double/single block (packed lengths dynamic; see docs/flux.md)"
    )

    @property
    def pretrained_refs(self) -> tuple[str, ...]:
        """What ``minfm cache models`` fetches: the file that loading reads, not the repo."""
        return (flux_source(self.pretrained),) if self.pretrained else ()

    def __attrs_post_init__(self) -> None:
        base = FLAVORS.get(self.flavor, {}) if self.flavor else {}
        missing = []
        for name in MODEL_FIELDS:
            if getattr(self, name) is None:
                if name in base:
                    object.__setattr__(self, name, base[name])
                else:
                    missing.append(name)
        if missing:
            raise ValueError(f"no flavor given, so these must be set: {', '.join(missing)}")
        if self.n_ds_blocks + self.n_ss_blocks < 1:
            raise ValueError("n_ss_blocks: n_ds_blocks + n_ss_blocks must be at least 1 (a denoiser without blocks learns nothing)")
        if self.d_model % self.d_head:
            raise ValueError(f"d_head: d_model {self.d_model} is not a multiple of d_head {self.d_head}")
        if len(self.rope_axes) != 3 or any(a <= 0 or a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes: {self.rope_axes} must be 3 positive even numbers (t, y, x)")
        if self.d_mlp < 1:  # int() rounds the width down: 0 made zero-width MLPs, trained without a word
            raise ValueError(f"mlp_ratio: {self.mlp_ratio} x d_model {self.d_model} gives MLPs of width "
                             f"{self.d_mlp}; it must give at least 1")

    @property
    def n_heads(self) -> int:
        return self.d_model // self.d_head

    @property
    def d_mlp(self) -> int:
        return int(self.d_model * self.mlp_ratio)


#: The fields a flavor fills in (everything but ``flavor``, ``pretrained`` and ``compile``).
MODEL_FIELDS = tuple(
    a.name for a in attrs.fields(FluxConfig) if a.name not in ("flavor", "pretrained", "compile")
)
