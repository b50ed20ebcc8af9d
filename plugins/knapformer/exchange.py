"""The autograd-aware all-to-all of rows that routing and Ulysses share.

``exchange(x, send, recv, group, extras)`` sends ``send[j]`` rows of ``x`` to rank j and
receives ``recv[j]`` from each; its backward is the reverse exchange. Extra per-row
tensors of any dtype travel in the same call, packed as bytes beside the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class _Exchange(torch.autograd.Function):
    """all_to_all_single over rows; backward sends the gradient back the same way reversed."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group, extra: Tensor | None):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        x = x.contiguous()
        if extra is None:
            out = x.new_empty((sum(recv), *x.shape[1:]))
            dist.all_to_all_single(out, x, recv, send, group=group)
            return out, None
        # Tokens and metadata as bytes in one buffer: one collective, metadata bit-exact.
        row = x.reshape(x.shape[0], math.prod(x.shape[1:]))
        tok_bytes = as_bytes(row)
        buf = torch.cat([tok_bytes, extra], dim=1)
        out = buf.new_empty((sum(recv), buf.shape[1]))
        dist.all_to_all_single(out, buf, recv, send, group=group)
        tokens = from_bytes(out[:, : tok_bytes.shape[1]], x.dtype, row.shape[1]).reshape(-1, *x.shape[1:])
        return tokens, out[:, tok_bytes.shape[1] :]

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_extra):
        grad = grad.contiguous()
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad, ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None, None


def as_bytes(x: Tensor) -> Tensor:
    """(n, k) of any dtype -> (n, nbytes) uint8, nbytes padded to a multiple of 8.

    The padding keeps every part of a packed row 8-byte aligned, so the receiver views
    each part back in place (no copy) whatever its dtype.
    """
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    b = x.contiguous().view(torch.uint8).reshape(x.shape[0], x.shape[1] * x.element_size())
    pad = -b.shape[1] % 8
    return torch.nn.functional.pad(b, (0, pad)) if pad else b


def from_bytes(b: Tensor, dtype: torch.dtype, numel: int) -> Tensor:
    """Inverse of :func:`as_bytes` for rows of ``numel`` values."""
    if dtype == torch.bool:
        return b[:, :numel].bool()
    size = torch.empty((), dtype=dtype).element_size()
    return b[:, : numel * size].view(dtype)


def exchange(x: Tensor, send: list[int], recv: list[int], group, extras: Sequence[Tensor] = ()):
    """Send rows of x (and of the extras) to the ranks in ``send`` counts; returns (x', extras')."""
    if not extras:
        out, _ = _Exchange.apply(x, send, recv, group, None)
        return out, []
    n = x.shape[0]
    metas = [(e.dtype, tuple(e.shape[1:]), math.prod(e.shape[1:])) for e in extras]
    parts = [as_bytes(e.detach().reshape(n, math.prod(e.shape[1:]))) for e in extras]
    widths = [p.shape[1] for p in parts]
    out, packed = _Exchange.apply(x, send, recv, group, torch.cat(parts, dim=1))
    outs, start = [], 0
    for (dtype, shape, numel), width in zip(metas, widths):
        outs.append(from_bytes(packed[:, start : start + width], dtype, numel).reshape(-1, *shape))
        start += width
    return out, outs
