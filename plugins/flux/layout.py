"""How a packed batch is laid out for the blocks: two streams (text, image) and their union.

Tokens are kept "grouped": when every sample of a stream has the same length the
stream is viewed as ``(n, l, ...)`` so that per-sample modulation broadcasts and
interleaving is one ``cat`` (a uniform batch costs no gathers at all); otherwise it
stays flat ``(L, ...)`` and per-sample values are gathered per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minfm_core.packing import cu_seqlens, interleave_index, segment_ids

from .rope import rope_tables


class Stream:
    """One packed stream: per-sample lengths and the sample (row of ``vec``) of every token."""

    def __init__(self, lens: Tensor, rows: Tensor | None = None):
        self.lens = lens.long()
        self.rows = rows  # which row of the per-sample tensors each sample uses (None: 0..n-1)
        self.seg = segment_ids(self.lens) if rows is None else rows[segment_ids(self.lens)]
        sizes = self.lens.tolist()
        self.uniform = sizes[0] if sizes and len(set(sizes)) == 1 else None
        self.n = len(sizes)

    def group(self, x: Tensor) -> Tensor:
        return x.unflatten(0, (self.n, self.uniform)) if self.uniform is not None else x

    def flat(self, x: Tensor) -> Tensor:
        return x.flatten(0, 1) if self.uniform is not None else x

    def tok(self, m: Tensor) -> Tensor:
        """A per-sample tensor ``(n_rows, k)`` made to broadcast against grouped tokens."""
        if self.uniform is not None:
            return (m if self.rows is None else m.index_select(0, self.rows))[:, None]
        # index_select, not m[seg]: its backward is one index_add_, several times faster
        # on CPU than the accumulating index_put_ that advanced indexing differentiates into.
        return m.index_select(0, self.seg)


class Layout:
    """Text stream, image stream, and the per-sample interleaved pack ``[txt_i, img_i]``.

    ``rows`` maps local samples to rows of ``vec`` (a sequence balancer that moved
    samples between ranks passes it; None means sample i uses row i).
    """

    def __init__(self, txt_lens, img_lens, img_pos, rope_axes, rope_theta, attention, rows=None):
        self.txt, self.img = Stream(txt_lens, rows), Stream(img_lens, rows)
        self.all = Stream(self.txt.lens + self.img.lens, rows)
        self.attention = attention
        self.cu_seqlens = cu_seqlens(self.all.lens)
        self.max_seqlen = int(self.all.lens.max()) if self.all.n else 0
        self.both_uniform = self.txt.uniform is not None and self.img.uniform is not None
        self.txt_index, self.img_index = interleave_index(self.txt.lens, self.img.lens)
        n_txt = self.txt_index.numel()
        # packed[p] = cat([txt, img])[perm[p]]: one gather interleaves both streams.
        self.perm = torch.empty(n_txt + self.img_index.numel(), dtype=torch.long, device=self.txt_index.device)
        self.perm[self.txt_index] = torch.arange(n_txt, device=self.perm.device)
        self.perm[self.img_index] = torch.arange(self.img_index.numel(), device=self.perm.device) + n_txt
        # Text positions are all zero (FLUX): RoPE is the identity there, so the image
        # stream carries the only non-trivial tables; the pack's tables pad text with 1 (no rotation).
        rot = rope_tables(img_pos, tuple(rope_axes), rope_theta)
        self.img_rope = self.img.group(rot)
        self.all_rope = self.all.group(self.merge_flat(rot.new_ones((n_txt, *rot.shape[1:])), rot))

    def merge_flat(self, t: Tensor, i: Tensor) -> Tensor:
        return torch.cat([t, i]).index_select(0, self.perm)

    def merge(self, t: Tensor, i: Tensor) -> Tensor:
        """Interleave grouped text and image tensors into the flat pack ``(L, ...)``."""
        if self.both_uniform:
            return torch.cat([t, i], dim=1).flatten(0, 1)
        return self.merge_flat(self.txt.flat(t), self.img.flat(i))

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Flat pack -> grouped (text, image)."""
        if self.both_uniform:
            g = x.unflatten(0, (self.all.n, self.all.uniform))
            return g[:, : self.txt.uniform], g[:, self.txt.uniform :]
        return self.txt.group(x.index_select(0, self.txt_index)), self.img.group(x.index_select(0, self.img_index))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention over the flat pack ``(L, H, D)`` through the backend; returns ``(L, H*D)``."""
        return self.attention(q, k, v, self.cu_seqlens, self.max_seqlen).flatten(1)
