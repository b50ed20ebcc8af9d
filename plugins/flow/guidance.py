"""Guidance rules: combine the conditional and unconditional velocities of packed samples."""

from __future__ import annotations

import torch
from torch import Tensor

from minfm_core.packing import expand_per_token, segment_sum

from .config import CFGConfig, EPCFGConfig


class CFG:
    """Classifier-free guidance (Ho & Salimans 2022): v = v_c + (s - 1)(v_c - v_u)."""

    def __init__(self, cfg: CFGConfig | None = None) -> None:
        self.cfg = cfg or CFGConfig()

    @property
    def scale(self) -> float:
        return self.cfg.scale

    @property
    def needs_uncond(self) -> bool:
        """False at scale 1: the engine can skip the unconditional forward pass."""
        return self.cfg.scale != 1.0

    def __call__(self, v_cond: Tensor, v_uncond: Tensor | None, lens: Tensor | None = None) -> Tensor:
        if not self.needs_uncond:
            return v_cond
        # Written around v_c (not v_u + s (v_c - v_u)) so that s = 1 gives v_c bit for bit.
        return v_cond + (self.cfg.scale - 1.0) * (v_cond - v_uncond)


def _energy(v: Tensor, lens: Tensor) -> Tensor:
    """Per-sample squared L2 norm over all its tokens and channels, in float32 or wider."""
    v = v if v.dtype == torch.float64 else v.float()
    return segment_sum(v.square().flatten(1).sum(1), lens)


class EPCFG(CFG):
    """Energy-preserving CFG (Zhang et al. 2024, arXiv 2412.09966).

    CFG, then each sample's guided velocity is scaled by sqrt(E_c / E_g), where E is the
    sum of squares over that sample's tokens, so its energy equals the conditional one's:
    large scales sharpen the direction without over-saturating.
    """

    def __init__(self, cfg: EPCFGConfig | None = None) -> None:
        self.cfg = cfg or EPCFGConfig()

    def __call__(self, v_cond: Tensor, v_uncond: Tensor | None, lens: Tensor | None = None) -> Tensor:
        if not self.needs_uncond:
            return v_cond
        if lens is None:
            raise ValueError("ep_cfg needs the per-sample token counts (lens) of the packed velocities")
        guided = super().__call__(v_cond, v_uncond, lens)
        e_cond, e_guided = _energy(v_cond, lens), _energy(guided, lens)
        ratio = torch.sqrt(e_cond / e_guided.clamp_min(torch.finfo(e_guided.dtype).tiny))
        per_token = expand_per_token(ratio, lens).view(-1, *([1] * (guided.dim() - 1)))
        # Scale in the energies' precision, then return the caller's dtype (bf16 stays bf16).
        return (guided.to(per_token.dtype) * per_token).to(guided.dtype)
