"""Packed variable-length sequences (the data model every component shares).

Tokens of all samples are concatenated along one axis, ``(sum(l_i), d)``, with
``datum_lens`` ``(n,)`` giving each sample's length. No padding: a batch may mix
resolutions, aspect ratios, frame counts and prompt lengths. Within a sample, text
tokens come first and image tokens follow ("interleaved" per sample:
``[txt_0, img_0, txt_1, img_1, ...]``). Positions are ``(sum(l_i), 3)`` as (t, y, x).

Everything here is vectorised torch (no Python loop over tokens) and device-agnostic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .protocols import Patched, Shape  # noqa: F401  (the core's shared types, re-exported here)


def cu_seqlens(lens: Tensor) -> Tensor:
    """Cumulative lengths ``(n + 1,)`` int32 starting at 0, as varlen attention kernels want."""
    out = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=lens.device)
    out[1:] = torch.cumsum(lens, 0)
    return out


def segment_ids(lens: Tensor) -> Tensor:
    """Sample index of every token: ``(sum(lens),)`` long."""
    return torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens.long())


def offsets(lens: Tensor) -> Tensor:
    """Start index of each sample ``(n,)`` long."""
    return torch.cumsum(lens.long(), 0) - lens.long()


def positions_in_segment(lens: Tensor) -> Tensor:
    """Index of every token within its own sample ``(sum(lens),)`` long."""
    ids = segment_ids(lens)
    return torch.arange(ids.numel(), device=lens.device) - offsets(lens)[ids]


def interleave_index(a_lens: Tensor, b_lens: Tensor) -> tuple[Tensor, Tensor]:
    """Where the tokens of ``a`` and of ``b`` land in the per-sample concatenation ``[a_i, b_i]``.

    Returns ``(a_index, b_index)``: ``packed[a_index] = a`` and ``packed[b_index] = b``.
    """
    a_lens, b_lens = a_lens.long(), b_lens.long()
    starts = offsets(a_lens + b_lens)
    a_index = starts[segment_ids(a_lens)] + positions_in_segment(a_lens)
    b_index = (starts + a_lens)[segment_ids(b_lens)] + positions_in_segment(b_lens)
    return a_index, b_index


def interleave(a: Tensor, a_lens: Tensor, b: Tensor, b_lens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample concatenation of two packed sequences (e.g. text then image).

    Returns ``(packed, datum_lens, a_index, b_index)``.
    """
    a_index, b_index = interleave_index(a_lens, b_lens)
    total = a.shape[0] + b.shape[0]
    packed = a.new_empty((total, *a.shape[1:]))
    packed[a_index] = a
    packed[b_index] = b.to(a.dtype)
    return packed, (a_lens + b_lens).long(), a_index, b_index


def deinterleave(packed: Tensor, a_lens: Tensor, b_lens: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`interleave`: pull the ``a`` and ``b`` tokens back out."""
    a_index, b_index = interleave_index(a_lens, b_lens)
    return packed[a_index], packed[b_index]


def segment_sum(x: Tensor, lens: Tensor) -> Tensor:
    """Per-sample sum over tokens: ``(L, ...) -> (n, ...)``."""
    out = x.new_zeros((lens.numel(), *x.shape[1:]))
    return out.index_add_(0, segment_ids(lens), x)


def segment_mean(x: Tensor, lens: Tensor) -> Tensor:
    """Per-sample mean over tokens; empty samples give 0."""
    s = segment_sum(x, lens)
    denom = lens.clamp(min=1).to(s.dtype).view(-1, *([1] * (x.dim() - 1)))
    return s / denom


def expand_per_token(values: Tensor, lens: Tensor) -> Tensor:
    """Repeat a per-sample tensor ``(n, ...)`` for every token ``(L, ...)``."""
    return values[segment_ids(lens)]


def group_by_shape(shapes) -> dict[tuple[int, ...], list[int]]:
    """Indices grouped by equal shape, groups in first-seen order (batch same-size samples, never pad)."""
    out: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        out.setdefault(tuple(s), []).append(i)
    return out


def split(x: Tensor, lens: Tensor) -> list[Tensor]:
    """Per-sample views of a packed tensor."""
    return list(torch.split(x, lens.tolist(), dim=0))
