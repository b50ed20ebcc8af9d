"""The patch3d patchifier: (C, F, H, W) latents <-> packed tokens with (t, y, x) positions.

A batch may mix frame counts, resolutions and aspect ratios. Work is vectorised per
group of equal shapes (one reshape/permute per group), then scattered into the pack in
the samples' original order. Token features are ordered (c, pf, ph, pw), which for
pf = 1 is FLUX's "c (h ph) (w pw) -> (h w) (c ph pw)" layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from minfm_core.errors import MinfmError
from minfm_core.packing import Patched, Shape, group_by_shape, offsets

from .config import Patch3DConfig

__all__ = ["Patch3D", "Patched"]  # Patched is the core's type (minfm_core.packing), re-exported


def _rows(starts: Tensor, idx: list[int], length: int) -> Tensor:
    """Pack rows of the samples ``idx`` (each ``length`` tokens), flattened in order."""
    first = starts[torch.as_tensor(idx, device=starts.device)]
    return (first[:, None] + torch.arange(length, device=starts.device)).reshape(-1)


class Patch3D:
    """Frames x height x width patches; exact inverse per sample."""

    def __init__(self, cfg: Patch3DConfig | None = None) -> None:
        self.cfg = cfg or Patch3DConfig()
        self.patch_size = tuple(self.cfg.patch_size)

    # --- sizes -----------------------------------------------------------------------

    def grid(self, shape: Shape, index: int | None = None) -> tuple[int, int, int]:
        """Patches along (frames, height, width) for a latent of ``shape`` (C, F, H, W)."""
        if len(shape) != 4:
            raise MinfmError(f"patch3d expects latents shaped (C, F, H, W), got {tuple(shape)}")
        _, *fhw = shape
        bad = [f"{name} {n} % {p}" for name, n, p in zip(("frames", "height", "width"), fhw, self.patch_size) if n % p]
        if bad:
            which = f"sample {index}: " if index is not None else ""
            # the hint names what does not divide: no image size mends a frame count
            hints = []
            if fhw[0] % self.patch_size[0]:
                hints.append(f"a frame count that makes a multiple of {self.patch_size[0]} latent frames "
                             "(a picture is 1 frame)")
            if any(n % p for n, p in zip(fhw[1:], self.patch_size[1:])):
                hints.append("an image size that is a multiple of the VAE compression times the patch")
            raise MinfmError(
                f"patch3d: {which}latent of shape {tuple(shape)} is not divisible by patch_size "
                f"{self.patch_size} ({', '.join(bad)} != 0); pick {' and '.join(hints)}"
            )
        return tuple(n // p for n, p in zip(fhw, self.patch_size))  # type: ignore[return-value]

    def num_tokens(self, shape: Shape) -> int:
        """Image tokens of one latent of ``shape`` (C, F, H, W)."""
        return math.prod(self.grid(shape))

    def token_dim(self, channels: int) -> int:
        """Feature size of one token for latents with ``channels`` channels."""
        return channels * math.prod(self.patch_size)

    def positions(self, shape: Shape, device=None) -> Tensor:
        """(t, y, x) of every token of one latent, ``(num_tokens, 3)`` long, raster order."""
        g = self.grid(shape)
        axes = [torch.arange(n, device=device) for n in g]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    # --- forward / inverse -----------------------------------------------------------

    def patchify(self, latents: Sequence[Tensor] | Tensor) -> Patched:
        """Latents (a list of (C, F, H, W), sizes may differ; or one (n, C, F, H, W) tensor) -> tokens."""
        latents = list(latents)
        if not latents:
            raise MinfmError("patch3d: no latents to patchify")
        shapes: list[Shape] = [tuple(x.shape) for x in latents]  # type: ignore[misc]
        lens_list = [math.prod(self.grid(s, i)) for i, s in enumerate(shapes)]  # validates every size
        chans = {s[0] for s in shapes}
        if len(chans) != 1:
            raise MinfmError(f"patch3d: latents in one batch must share their channel count, got {sorted(chans)}")
        ref = latents[0]
        lens = torch.tensor(lens_list, dtype=torch.long, device=ref.device)
        starts = offsets(lens)
        total = int(lens.sum())
        pf, ph, pw = self.patch_size
        tokens = ref.new_empty((total, self.token_dim(shapes[0][0])))
        pos = torch.empty((total, 3), dtype=torch.long, device=ref.device)
        for shape, idx in group_by_shape(shapes).items():
            c = shape[0]
            gf, gh, gw = self.grid(shape)
            x = torch.stack([latents[i] for i in idx])  # (g, C, F, H, W)
            x = x.reshape(len(idx), c, gf, pf, gh, ph, gw, pw)
            # -> (g, gf, gh, gw, c, pf, ph, pw): patches in raster order, features channel-major.
            x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(len(idx) * gf * gh * gw, -1)
            rows = _rows(starts, idx, gf * gh * gw)
            tokens[rows] = x.to(tokens.dtype)
            pos[rows] = self.positions(shape, device=ref.device).repeat(len(idx), 1)
        return Patched(tokens=tokens, pos=pos, lens=lens, shapes=shapes)

    def unpatchify(self, tokens: Tensor, lens: Tensor, shapes: Sequence[Shape]) -> list[Tensor]:
        """Exact inverse of :meth:`patchify`: one (C, F, H, W) tensor per sample."""
        shapes = [tuple(s) for s in shapes]  # type: ignore[misc]
        if len(shapes) != lens.numel():
            raise ValueError(f"unpatchify: {len(shapes)} shapes for {lens.numel()} samples")
        want = [self.num_tokens(s) for s in shapes]
        if want != lens.tolist():
            raise ValueError(f"unpatchify: token counts {lens.tolist()} do not match shapes {shapes} ({want})")
        pf, ph, pw = self.patch_size
        starts = offsets(lens.to(tokens.device))
        out: list[Tensor | None] = [None] * len(shapes)
        for shape, idx in group_by_shape(shapes).items():
            c = shape[0]
            if tokens.shape[1] != self.token_dim(c):
                raise ValueError(f"unpatchify: tokens have {tokens.shape[1]} features, {c} channels need {self.token_dim(c)}")
            gf, gh, gw = self.grid(shape)
            x = tokens[_rows(starts, idx, gf * gh * gw)]
            x = x.reshape(len(idx), gf, gh, gw, c, pf, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
            x = x.reshape(len(idx), *shape)
            for j, i in enumerate(idx):
                out[i] = x[j]
        return out  # type: ignore[return-value]
