"""What plugin components hand the engine, checked where they hand it.

One implementation for two callers: the engine (``engine/pipeline.py``, on every batch) and
the conformance kit (``minfm_core.testing.check_*``). The rules are the protocols'
(``minfm_core.protocols``, docs/plugins.md): a dataset item is a dict with a ``"prompt"``
string and an ``"image"`` float tensor ``(3, F, H, W)`` in [-1, 1] (or a ``"latent"``
``(C, F, h, w)``); a time sampler's and a time warper's ``t`` is a float tensor ``(n,)`` in
[0, 1]; a time weighter's ``w`` a float tensor ``(n,)``, finite and >= 0; a denoiser's
velocity a fresh float tensor of its input's shape; a sampler's result and guidance's
velocity a float tensor of its input's shape; an attention backend's output one of q's shape
and dtype; a probability path's ``x_t`` and target float tensors of ``x0``'s shape; a
patchifier's :class:`~minfm_core.protocols.Patched` tokens ``(L, D)``, ``pos (L, 3)`` and
``lens (n,)`` integers summing to L, and its ``unpatchify`` the latents' shapes again; a
text encoder's tokens ``(L, dim)`` with ``lens (n,)`` summing to L (``(n, dim)`` when
pooled); a VAE's latents ``(C, F', h, w)`` as its config's ``latent_channels`` and
``compression`` make them, and its decoded images the encoded sizes again.

Each function returns None when the value keeps the rule, else what is wrong as
``expected ..., got ...`` (the caller says whose value it was). ``values=False`` checks
type, shape and dtype only: those are free, while reading the values of a tensor on a GPU
waits for it (the engine reads those once, on the first batch; values on the CPU always).
No torch at module top: the kit imports this.
"""

from __future__ import annotations

import math
from typing import Any

#: Where a dataset's image values lie (protocols.Dataset).
IMAGE_RANGE = (-1.0, 1.0)
#: Where training times lie (protocols.TimeSampler, protocols.TimeWarper): 0 clean, 1 noise.
TIME_RANGE = (0.0, 1.0)


def _tensor_type():
    import torch

    return torch.Tensor


def _type(x: Any) -> str:
    cls = type(x)
    module = cls.__module__.split(".")[0]
    return cls.__name__ if module == "builtins" else f"{module}.{cls.__name__}"


def _num(x: float) -> str:
    return f"{x:.4g}"


def values_problem(x: Any, lo: float | None, hi: float | None) -> str | None:
    """Whether every value of tensor ``x`` is finite and in ``[lo, hi]`` (None: unbounded)."""
    if x.numel() == 0:
        return None
    # two plain reductions (NaN propagates through both): torch.aminmax, one pass, measured
    # several times slower on a CPU image (its parallel kernel)
    x = x.detach()
    least, most = float(x.amin()), float(x.amax())
    if math.isnan(least) or math.isnan(most):
        return "expected finite values, got NaN"
    if math.isinf(least) or math.isinf(most):
        return "expected finite values, got an infinity"
    if (lo is not None and least < lo) or (hi is not None and most > hi):
        want = f"[{_num(lo)}, {_num(hi)}]" if lo is not None and hi is not None else \
            (f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}")
        return f"expected values {'in ' if lo is not None and hi is not None else ''}{want}, " \
               f"got [{_num(least)}, {_num(most)}]"
    return None


def vector_problem(x: Any, n: int, lo: float | None = None, hi: float | None = None, *,
                   values: bool = True) -> str | None:
    """A float tensor of shape ``(n,)`` with finite values in ``[lo, hi]``."""
    if not isinstance(x, _tensor_type()):
        return f"expected a tensor of shape ({n},), got {_type(x)}"
    if tuple(x.shape) != (n,):
        return f"expected shape ({n},), got {tuple(x.shape)}"
    if not x.is_floating_point():
        return f"expected a floating-point tensor, got {x.dtype}"
    return values_problem(x, lo, hi) if values else None


def counts_problem(counts: Any, n: int) -> str | None:
    """A text encoder's ``count_tokens`` of ``n`` prompts: None (cannot tell) or ``n`` ints >= 0."""
    if counts is None:
        return None
    if not isinstance(counts, (list, tuple)) or len(counts) != n:
        return f"expected None or a list of {n} ints, got {_type(counts)}" + \
            (f" of {len(counts)}" if isinstance(counts, (list, tuple)) else "")
    bad = next((c for c in counts if type(c) is not int or c < 0), None)
    if bad is not None:
        return f"expected token counts (ints >= 0), got {bad!r}"
    return None


def times_problem(t: Any, n: int, *, values: bool = True) -> str | None:
    """Training times ``(n,)`` in [0, 1] (a time sampler's or a time warper's)."""
    return vector_problem(t, n, *TIME_RANGE, values=values)


def weights_problem(w: Any, n: int, *, values: bool = True) -> str | None:
    """Loss weights ``(n,)``, finite and >= 0 (a time weighter's): a negative weight would
    train the denoiser away from the target."""
    return vector_problem(w, n, 0.0, None, values=values)


def image_problem(x: Any, *, values: bool = True) -> str | None:
    """A dataset item's ``"image"``: a float tensor ``(3, F, H, W)`` in [-1, 1]."""
    if not isinstance(x, _tensor_type()):
        return f"'image': expected a torch tensor (3, F, H, W), got {_type(x)}"
    if x.dim() != 4 or x.shape[0] != 3:
        return f"'image': expected shape (3, F, H, W) (RGB, frames, height, width), got {tuple(x.shape)}"
    if not x.is_floating_point():
        return f"'image': expected floating-point values in [-1, 1], got {x.dtype}"
    why = values_problem(x, *IMAGE_RANGE) if values else None
    return None if why is None else f"'image': {why}"


def latent_problem(x: Any) -> str | None:
    """A dataset item's cached ``"latent"``: a float tensor ``(C, F, h, w)``."""
    if not isinstance(x, _tensor_type()):
        return f"'latent': expected a torch tensor (C, F, h, w), got {_type(x)}"
    if x.dim() != 4:
        return f"'latent': expected shape (C, F, h, w), got {tuple(x.shape)}"
    if not x.is_floating_point():
        return f"'latent': expected a floating-point tensor, got {x.dtype}"
    return None


def item_problem(item: Any, *, values: bool = True) -> str | None:
    """A dataset item: a dict with a ``"prompt"`` string and an ``"image"`` or a ``"latent"``."""
    if not isinstance(item, dict):
        return f"expected a dict with 'image' (or 'latent') and 'prompt', got {_type(item)}"
    if "prompt" not in item:
        return "expected a 'prompt' string, got no 'prompt'"
    if not isinstance(item["prompt"], str):
        return f"'prompt': expected a string, got {_type(item['prompt'])}"
    if "image" in item:
        return image_problem(item["image"], values=values)
    if "latent" in item:
        return latent_problem(item["latent"])
    return f"expected an 'image' or a 'latent', got only {', '.join(map(repr, item)) or 'nothing'}"


def shaped_like_problem(v: Any, x: Any) -> str | None:
    """A float tensor of ``x``'s shape: what a sampler returns for its noise ``x``, and what
    guidance returns for its velocities."""
    if not isinstance(v, _tensor_type()):
        return f"expected a tensor of shape {tuple(x.shape)} (the input's), got {_type(v)}"
    if v.shape != x.shape:
        return f"expected shape {tuple(x.shape)} (the input's), got {tuple(v.shape)}"
    if not v.is_floating_point():
        return f"expected a floating-point tensor, got {v.dtype}"
    return None


def same_dtype_problem(v: Any, x: Any) -> str | None:
    """``v`` (already a float tensor shaped like ``x``) of ``x``'s dtype: an attention backend's
    output for q (one in another dtype failed in the denoiser's next matmul, blamed on the
    denoiser). Where autocast is on for ``x``'s device any floating dtype passes: the next
    matmul casts it (torch's own attention answers in autocast's dtype there)."""
    import torch

    if v.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    return f"expected dtype {x.dtype} (the input's), got {v.dtype}"


def attention_problem(out: Any, q: Any) -> str | None:
    """An attention backend's output for ``q``: a float tensor of its shape and dtype."""
    return shaped_like_problem(out, q) or same_dtype_problem(out, q)


def patched_problem(patched: Any, n: int, *, values: bool = True) -> str | None:
    """A patchifier's ``patchify`` of ``n`` latents: a :class:`~minfm_core.protocols.Patched`
    of float ``tokens (L, D)``, integer ``pos (L, 3)``, integer ``lens (n,)`` >= 0 summing to
    L (``values``: read lens, which waits for a GPU) and ``n`` latent ``shapes``."""
    from .protocols import Patched

    if not isinstance(patched, Patched):
        return f"expected a minfm_core.packing.Patched, got {_type(patched)}"
    problem = _float_tensor_problem(patched.tokens, (-1, -1), "tokens (L, D)")
    if problem is not None:
        return problem
    rows = patched.tokens.shape[0]
    problem = _int_tensor_problem(patched.pos, (rows, 3), "pos") or _int_tensor_problem(patched.lens, (n,), "lens")
    if problem is not None:
        return problem
    if not isinstance(patched.shapes, (list, tuple)) or len(patched.shapes) != n:
        got = f"{_type(patched.shapes)}" + (f" of {len(patched.shapes)}" if isinstance(patched.shapes, (list, tuple)) else "")
        return f"expected {n} latent shapes, got {got}"
    if values and n:
        least, total = int(patched.lens.min()), int(patched.lens.sum())
        if least < 0 or total != rows:
            return f"expected lens >= 0 summing to the {rows} token rows, got {patched.lens.tolist()[:8]}" + \
                ("..." if n > 8 else "")
    return None


def unpatched_problem(latents: Any, shapes: list[tuple[int, ...]]) -> str | None:
    """A patchifier's ``unpatchify``: one float latent per sample, of the shape it was given."""
    return _list_problem(latents, [tuple(s) for s in shapes], "latent")


def velocity_problem(v: Any, x: Any) -> str | None:
    """A denoiser's output for input tokens ``x``: a fresh float tensor of ``x``'s shape (not
    ``x`` itself, nor a view of it: training differentiates the output)."""
    problem = shaped_like_problem(v, x)
    if problem is not None:
        return problem
    if v is x or (v.device.type != "meta" and v.numel() and v.data_ptr() == x.data_ptr()):
        return "expected a fresh tensor, got its input (or a view of it)"
    return None


def _float_tensor_problem(x: Any, shape: tuple[int, ...], what: str) -> str | None:
    """A float tensor of ``shape`` (-1: any size there; ``what`` names the value, as ``expected`` says it)."""
    if not isinstance(x, _tensor_type()):
        return f"expected {what} tensor of shape {shape}, got {_type(x)}"
    if x.dim() != len(shape) or any(want not in (-1, got) for want, got in zip(shape, x.shape)):
        shown = "(" + ", ".join("?" if d == -1 else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
        return f"expected {what} of shape {shown}, got {tuple(x.shape)}"
    if not x.is_floating_point():
        return f"expected {what} as a floating-point tensor, got {x.dtype}"
    return None


def _int_tensor_problem(x: Any, shape: tuple[int, ...], name: str) -> str | None:
    """An integer tensor of ``shape`` (token counts, positions)."""
    if not isinstance(x, _tensor_type()) or tuple(x.shape) != shape or x.is_floating_point() or x.is_complex():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, _tensor_type()) else _type(x)
        return f"expected {name} as an integer tensor of shape {shape}, got {got}"
    return None


def text_problem(out: Any, n: int, dim: int | None, pooled: bool) -> str | None:
    """A text encoder's answer for ``n`` prompts: ``(tokens (L, dim), lens (n,))`` packed, lens
    integers >= 0 summing to L; or ``(n, dim)`` when ``pooled`` (its config's ``dim``; None:
    a config without one, any width)."""
    dim = -1 if dim is None else dim
    if pooled:
        return _float_tensor_problem(out, (n, dim), "pooled vectors")
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return f"expected (tokens (L, dim), lens ({n},)), got {_type(out)}" + \
            (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
    tokens, lens = out
    if problem := _int_tensor_problem(lens, (n,), "lens"):
        return problem
    total = -1  # lens' values on a GPU: reading them would wait for it (the denoiser checks the sum)
    if lens.device.type == "cpu":
        total = int(lens.sum()) if n else 0
        if n and int(lens.min()) < 0:
            return f"expected lens >= 0, got {int(lens.min())}"
    return _float_tensor_problem(tokens, (total, dim), "tokens (sum(lens), dim)")


def latent_shape(channels: int, compression: tuple[int, int, int], size: tuple[int, int, int], *,
                 floor: bool = False) -> tuple[int, ...]:
    """``(C, F', h, w)``: what a VAE of ``latent_channels`` and ``compression`` (frames, height,
    width) makes of an image ``(3, F, H, W)`` of ``size`` (F, H, W); a video VAE (frames
    compressed) keeps the first frame, so F' = 1 + (F - 1) / cf. A side the compression does
    not divide is -1 (left to the VAE: padding or cropping is its own choice), or with
    ``floor`` rounded down (the noise the engine draws for a size)."""
    cf, ch, cw = compression
    f, h, w = size

    def cut(n: int, c: int) -> int:
        return n // c if floor or n % c == 0 else -1

    after_first = cut(f - 1, cf)  # a video VAE keeps the first frame whole
    frames = f if cf == 1 else (-1 if after_first == -1 else 1 + after_first)
    return (channels, frames, cut(h, ch), cut(w, cw))


def _list_problem(xs: Any, shapes: list[tuple[int, ...]], what: str) -> str | None:
    if not isinstance(xs, (list, tuple)) or len(xs) != len(shapes):
        return f"expected a list of {len(shapes)} {what}s, got {_type(xs)}" + \
            (f" of {len(xs)}" if isinstance(xs, (list, tuple)) else "")
    for i, (x, shape) in enumerate(zip(xs, shapes)):
        problem = _float_tensor_problem(x, shape, f"{what} {i}")
        if problem is not None:
            return problem
    return None


def latents_problem(latents: Any, images: list[Any], vae_cfg: Any) -> str | None:
    """A VAE's ``encode`` of ``images``: one latent per image, of the shape :func:`latent_shape`
    gives it from the VAE's config (``latent_channels``, ``compression``)."""
    shapes = [latent_shape(vae_cfg.latent_channels, vae_cfg.compression, tuple(x.shape[1:])) for x in images]
    return _list_problem(latents, shapes, "latent")


def decoded_problem(images: Any, sizes: list[tuple[int, int, int]]) -> str | None:
    """A VAE's ``decode``: one image ``(3, F, H, W)`` per latent, of the size it was encoded from."""
    return _list_problem(images, [(3, *size) for size in sizes], "image")
