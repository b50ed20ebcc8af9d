"""Drawing a sample of a VAE's diagonal Gaussian posterior with one generator per image.

The engine hands ``encode`` one generator per image (``protocols.Vae``): a sample's posterior
noise then depends on that sample alone, not on which others share its batch, its micro-batch
split or the number of processes, and a resumed run draws it again exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def posterior_sample(dist, generators: Sequence[torch.Generator] | None) -> Tensor:
    """``mean + std * noise`` of diffusers' ``DiagonalGaussianDistribution`` ``dist``; row ``r`` of
    the noise comes from ``generators[r]`` (None: torch's global generator, as ``dist.sample()``).
    Drawn in float32 on the generator's device, then moved: the same numbers on any device."""
    if generators is None:
        return dist.sample()
    mean = dist.mean
    if len(generators) != mean.shape[0]:
        raise ValueError(f"posterior_sample: {len(generators)} generators for {mean.shape[0]} rows")
    noise = torch.stack([torch.randn(mean.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                         for g in generators])
    return mean + dist.std * noise.to(mean.device, mean.dtype)
