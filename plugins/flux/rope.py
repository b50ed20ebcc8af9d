"""Multi-axis rotary position embedding over (t, y, x) token positions (FLUX's RoPE).

Each axis owns ``rope_axes[i]`` channels of a head; channel pairs ``(2j, 2j+1)`` of
axis ``i`` rotate by ``pos_i * theta ** (-2j / rope_axes[i])``. Tables are computed in
float64 once per forward and applied in float32, as BFL does.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_tables(pos: Tensor, axes: tuple[int, ...], theta: int) -> Tensor:
    """Complex rotations ``(L, 1, sum(axes) // 2)`` (complex64) for integer positions ``(L, n_axes)``."""
    angles = []
    for i, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        angles.append(pos[:, i].to(torch.float64)[:, None] * freqs[None])
    ang = torch.cat(angles, dim=-1)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64).unsqueeze(1)


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate channel pairs of ``x`` ``(..., H, D)`` by :func:`rope_tables` (one complex multiply)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)
