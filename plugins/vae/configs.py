"""Configs of the built-in VAEs (no torch here: plugin loading stays fast)."""

from __future__ import annotations

from minfm_core.config import Dtype, config, field
from minfm_core.validators import MAX_DEPTH, MAX_FRAMES, MAX_WIDTH, Range
from minfm_core.pretrained import is_local, parse_hub_ref

#: Channels of a level, an image or the latents.
CHANNELS = Range(1, MAX_WIDTH)
#: Blocks per level.
BLOCKS = Range(1, MAX_DEPTH)
#: Resolution levels: each after the first halves H and W, so 8 levels downsample 128x.
MAX_LEVELS = 8
#: FLUX's latent scale and shift: what an original ``ae.safetensors`` (which records none) uses.
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


def _groups_divide_channels(inst, attribute, value) -> None:
    bad = [c for c in inst.block_out_channels if c % value]
    if bad:
        raise ValueError(f"{attribute.name}: {value} does not divide block_out_channels {bad}")


def _levels(inst, attribute, value) -> None:
    if not 1 <= len(value) <= MAX_LEVELS:
        raise ValueError(f"{attribute.name}: expected 1 to {MAX_LEVELS} levels, got {len(value)}")


def from_pretrained_kwargs() -> dict:
    """``low_cpu_mem_usage`` for diffusers' ``from_pretrained``: on only where ``accelerate`` is
    installed. Without it diffusers turns the option off anyway, after a warning on every load
    that asks to install a package a CPU or a single-GPU run does not need."""
    import importlib.util

    return {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}


def vae_source(pretrained: str) -> str:
    """A Hub repo root means its diffusers ``vae/`` folder (FLUX repos are diffusers pipelines)."""
    hub = None if is_local(pretrained) else parse_hub_ref(pretrained)
    return f"{pretrained}/vae" if hub is not None and not hub.subpath else pretrained


@config
class FluxAEConfig:
    """FLUX autoencoder (diffusers AutoencoderKL): 16 latent channels, 8x downsampling, scale and shift."""

    pretrained: str | None = field(
        "black-forest-labs/FLUX.1-schnell/vae",
        doc="a diffusers VAE folder (or a pipeline folder with vae/), an original BFL ae.safetensors file, "
        "or a Hub reference org/name[@rev][/path] to either (a bare repo id means its vae/); None: random weights",
        file="ref",
    )
    dtype: Dtype = field("bf16", doc="weights and compute dtype; latents come back in the images' dtype")
    sample_posterior: bool = field(True, doc="encode to a sample of the posterior (as the seed and FLUX do), not its mean")
    scale: float | None = field(
        None, doc="latent = scale * (z - shift) on encode, undone on decode; None: the weights' own (a diffusers "
        "folder's config.json scaling_factor, else FLUX's 0.3611); a value the folder contradicts is an error",
        validator=Range(0, 100, lo_open=True),
    )
    shift: float | None = field(
        None, doc="latent shift; None: the weights' own (config.json shift_factor, else FLUX's 0.1159)",
        validator=Range(-100, 100),
    )
    chunk_size: int = field(
        64, doc="frames per encoder/decoder call (bounds activation memory)", validator=Range(1, MAX_FRAMES)
    )
    image_channels: int = field(3, doc="channels of the images", validator=CHANNELS)
    latent_channels: int = field(16, doc="channels of the latents (FLUX: 16)", validator=CHANNELS)
    block_out_channels: tuple[int, ...] = field(
        (128, 256, 512, 512), doc="channels per resolution level; each level after the first halves H and W",
        validator=[CHANNELS, _levels],
    )
    layers_per_block: int = field(2, doc="ResNet blocks per encoder level (the decoder has one more)", validator=BLOCKS)
    norm_num_groups: int = field(32, doc="GroupNorm groups; must divide every block_out_channels entry",
                                 validator=[CHANNELS, _groups_divide_channels])

    @property
    def compression(self) -> tuple[int, int, int]:
        """(frames, height, width) downsampling: an image VAE keeps frames, halves H/W per extra level."""
        s = 2 ** (len(self.block_out_channels) - 1)
        return (1, s, s)

    @property
    def pretrained_refs(self) -> tuple[str, ...]:
        return (vae_source(self.pretrained),) if self.pretrained else ()


@config
class IdentityVAEConfig:
    """No autoencoder: train on pixels (small data); compression 1, latent channels = image channels."""

    channels: int = field(3, doc="channels of the images (and so of the 'latents')", validator=CHANNELS)

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def compression(self) -> tuple[int, int, int]:
        return (1, 1, 1)


def _one_flag_per_level(inst, attribute, value) -> None:
    if len(value) != len(inst.dim_mult) - 1:
        raise ValueError(
            f"{attribute.name}: {len(value)} flags for {len(inst.dim_mult) - 1} downsampling levels "
            f"(one per dim_mult entry after the first)"
        )


@config
class WanVAEConfig:
    """Wan 2.1's causal 3-D video VAE (diffusers AutoencoderKLWan): 4x in time (first frame kept), 8x in space."""

    pretrained: str | None = field(
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae",
        doc="a diffusers AutoencoderKLWan folder (or a pipeline folder with vae/), or a Hub reference "
        "org/name[@rev][/path] to one (a bare repo id means its vae/); None: random weights",
        file="ref",
    )
    dtype: Dtype = field("fp32", doc="weights and compute dtype (Wan runs its VAE in fp32); latents come back in the images' dtype")
    sample_posterior: bool = field(
        False, doc="encode to a sample of the posterior; false: its mean (what diffusers' Wan pipelines use)"
    )
    base_dim: int = field(96, doc="channels of the first level (Wan 2.1: 96)", validator=CHANNELS)
    z_dim: int = field(16, doc="latent channels (Wan 2.1: 16)", validator=CHANNELS)
    dim_mult: tuple[int, ...] = field(
        (1, 2, 4, 4), doc="channel multiplier per level; each level after the first halves H and W",
        validator=[Range(1, 64), _levels],
    )
    num_res_blocks: int = field(2, doc="residual blocks per level", validator=BLOCKS)
    temperal_downsample: tuple[bool, ...] = field(
        (False, True, True), doc="per downsampling level, whether it also halves time (diffusers' spelling)",
        validator=_one_flag_per_level,
    )
    image_channels: int = field(3, doc="channels of the images", validator=CHANNELS)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def compression(self) -> tuple[int, int, int]:
        """(frames, height, width): clips of 1 + t*k frames become 1 + k latent frames."""
        s = 2 ** (len(self.dim_mult) - 1)
        return (2 ** sum(bool(t) for t in self.temperal_downsample), s, s)

    @property
    def pretrained_refs(self) -> tuple[str, ...]:
        return (vae_source(self.pretrained),) if self.pretrained else ()
