"""Config classes of the flow-matching components (no torch here: loaded with the plugin)."""

from __future__ import annotations



from minfm_core.config import Dtype, config, field
from minfm_core.validators import MAX_GUIDANCE, MAX_SOLVER_STEPS, MAX_TOKENS, Range

#: A patch or compression side in latent cells (FLUX: 2; Wan's VAE: 4 in time, 8 in space).
PATCH = Range(1, 64)
#: The mean of a logit-normal (or a log-shift): at +-10 the median t is within 5e-5 of 0 or 1.
LOGIT_MEAN = Range(-10, 10)
#: Its spread, on the same logit scale.
LOGIT_STD = Range(0, 10, lo_open=True)
#: A weighter's density divides by sigma and squares 1/sigma: below this it is inf or NaN in fp32.
WEIGHT_STD = Range(1e-3, 10)
#: A guidance scale.
GUIDANCE = Range(0, MAX_GUIDANCE)


def _positive_ints(instance, attribute, value) -> None:
    if value is None:
        return
    if len(value) != 3 or any(v < 1 for v in value):
        raise ValueError(f"{attribute.name}: must be three positive ints (frames, height, width), got {value!r}")


@config
class Patch3DConfig:
    """Cut (C, F, H, W) latents into frames x height x width patches; mixed sizes per batch."""

    patch_size: tuple[int, int, int] = field(
        (1, 2, 2), doc="patch extent in latent cells as (frames, height, width)", validator=[PATCH, _positive_ints]
    )
    vae_compression: tuple[int, int, int] | None = field(
        None, doc="the VAE's (frames, height, width) compression; checked against the VAE when set",
        validator=[PATCH, _positive_ints],
    )


@config
class RectifiedConfig:
    """Rectified flow: x_t = (1 - t) x0 + t eps, target v = eps - x0 (t = 0 clean, t = 1 noise)."""

    compute_dtype: Dtype = field("fp32", doc="dtype x_t and the target are computed in")


@config
class UniformTimeConfig:
    """t ~ U(0, 1)."""


@config
class LogitNormalTimeConfig:
    """t = sigmoid(mu + sigma * z), z ~ N(0, 1) (SD3's logit-normal sampling)."""

    mu: float = field(0.0, doc="mean of the normal before the sigmoid (> 0 favours noisier t)", validator=LOGIT_MEAN)
    sigma: float = field(1.0, doc="std of the normal before the sigmoid", validator=LOGIT_STD)


def _lens_differ(instance, attribute, value) -> None:
    if value == instance.base_len:
        raise ValueError(f"{attribute.name}: must differ from base_len ({value})")


@config
class ResolutionShiftConfig:
    """Shift t towards noise for larger images: mu linear in token count, t' = e^mu / (e^mu + 1/t - 1) (FLUX)."""

    base_len: int = field(256, doc="token count at which the shift is base_shift", validator=Range(1, MAX_TOKENS))
    base_shift: float = field(0.5, doc="mu at base_len (the shift is e^mu)", validator=LOGIT_MEAN)
    max_len: int = field(4096, doc="token count at which the shift is max_shift", validator=[Range(1, MAX_TOKENS), _lens_differ])
    max_shift: float = field(1.15, doc="mu at max_len (extrapolated linearly beyond)", validator=LOGIT_MEAN)


@config
class NoWarpConfig:
    """Identity: t is used as sampled."""


@config
class UniformWeightConfig:
    """Every t weighs 1."""


@config
class LogitNormalWeightConfig:
    """Weight the loss by the logit-normal pdf at t (its mean under t ~ U(0, 1) is 1)."""

    mu: float = field(0.0, doc="mean of the normal before the sigmoid", validator=LOGIT_MEAN)
    sigma: float = field(1.0, doc="std of the normal before the sigmoid", validator=WEIGHT_STD)


@config
class EulerConfig:
    """First-order ODE solver: x <- x + (t_next - t) v (one velocity call per step)."""


@config
class HeunConfig:
    """Second-order ODE solver (Heun's trapezoid predictor-corrector; two velocity calls per step)."""


@config
class DDIMSDEConfig:
    """The seed's eta-controlled DDIM step: eta = 0 is deterministic DDIM (= Euler), eta = 1 stochastic."""

    eta: float = field(1.0, doc="share of fresh noise injected per step (0: deterministic; a step saturates to all fresh "
                     "noise near eta = steps)", validator=Range(0, MAX_SOLVER_STEPS))


@config
class CFGConfig:
    """Classifier-free guidance: v = v_u + s (v_c - v_u)."""

    scale: float = field(5.0, doc="guidance scale s (1: conditional only, no unconditional pass)",
                         validator=GUIDANCE)


@config
class EPCFGConfig:
    """Energy-preserving CFG: CFG rescaled per sample to the conditional velocity's energy (arXiv 2412.09966)."""

    scale: float = field(5.0, doc="guidance scale s (1: conditional only, no unconditional pass)",
                         validator=GUIDANCE)
