"""``compile = true``: every FLUX block runs as two ``torch.compile``\\ d halves around attention.

Why this shape:

- **Per block, inside the block's ``forward``.** FSDP2's hooks and activation
  checkpointing wrap ``block.forward`` and stay eager and unchanged; only the block's own
  arithmetic is compiled (as torchtitan compiles its blocks). All blocks of one kind share
  one compiled graph (dynamo inlines ``nn.Module``\\ s, parameters are graph inputs).
- **Attention eager, between two compiled halves.** The backends need Python-side work
  per pack (sdpa's length buckets, flash-attn's ``max_seqlen``, a balancer's all-to-alls)
  and have their own backward; a graph break there keeps every backend and its native
  backward as they are (a custom op would need either a recomputing backward, one more
  attention forward per layer, or each backend's own saved-state backward re-wrapped).
  Measured: the eager attention between the halves costs what it costs in an eager model
  (docs/performance.md, "Compiled blocks").
- **Padding fused.** Where the backend runs in a padded layout (sdpa on CPU/fp32), the
  first half gathers q/k/v straight into it and the second reads the output back from it.
- **Lengths are tensor sizes, never Python ints.** The halves take flat streams and
  tensors only (per-token sample maps, interleaving permutations, RoPE tables as real
  cos/sin pairs); their token and sample dimensions are marked dynamic before the first
  call, so a new pack length runs the same graph: one graph per half with gradients and
  one without (validation, sampling), whatever the packs hold.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from minfm_core.errors import MinfmError, first_line

from .layout import Layout

if TYPE_CHECKING:  # layers.py calls into this module: no import back at run time
    from .layers import DoubleStreamBlock, SingleStreamBlock

#: Per-sample modulation reaches the tokens through a gather whose backward is a one-hot
#: GEMM ("onehot": deterministic, fast for the few samples of a micro-batch) or a plain
#: gather ("index"), whose backward is a scatter-add that inductor on CPU turns into atomic
#: adds (slow; order-dependent sums, so resumed runs would not be bitwise equal). The
#: one-hot costs L x n per stream, so packs of many samples (above the limit) gather.
SELECT = "onehot"
ONEHOT_MAX_SAMPLES = 64


class FlatLayout:
    """What the compiled halves need of a :class:`Layout`: flat tensors, nothing else.

    ``like`` is a tensor of the blocks' activations (device and dtype decide whether the
    attention backend pads, see ``padding_plan`` in plugins/attention/backends.py).
    """

    def __init__(self, lay: Layout, n_rows: int, like: Tensor):
        self.txt_sel, self.img_sel, self.all_sel = (_selector(s.seg, n_rows) for s in (lay.txt, lay.img, lay.all))
        # Complex tables as real (cos, sin) halves for rope_split, flat (the image table is
        # grouped when uniform).
        self.img_rot, self.all_rot = (torch.view_as_real(s.flat(r)).transpose(-1, -2).contiguous()
                                      for s, r in ((lay.img, lay.img_rope), (lay.all, lay.all_rope)))
        # Where pack token p sits in the backend's layout: its padded row, or p itself.
        planner = getattr(lay.attention, "padding_plan", None)
        self.plan = planner(lay.cu_seqlens, _q_like(like)) if planner is not None else None
        L = lay.perm.numel()
        row = self.plan.row if self.plan is not None else torch.arange(L, device=lay.perm.device)
        rows = self.plan.rows if self.plan is not None else L
        # src: layout row -> pack token (L: the zero row appended to the pack, for padding);
        # the double blocks gather from cat([txt, img]), hence perm composed in.
        self.all_src = torch.full((rows,), L, dtype=torch.long, device=row.device).index_copy_(
            0, row, torch.arange(L, device=row.device))
        self.cat_src = torch.full_like(self.all_src, L).index_copy_(0, row, lay.perm)
        # The inverses: the layout row of every pack token / of every text-then-image token.
        self.all_inv = row
        self.cat_inv = torch.empty_like(row).index_copy_(0, lay.perm, row)
        for t in (self.img_rot, self.all_rot, self.all_src, self.cat_src, self.all_inv, self.cat_inv):
            _dynamic(t)

    def attend(self, lay: Layout, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention in the backend's layout ``(rows, H * D)``."""
        if self.plan is None:
            return _dynamic(lay.attend(q, k, v))
        return _dynamic(lay.attention.attend_padded(q, k, v, self.plan).flatten(1))


def _q_like(x: Tensor) -> Tensor:
    """A tensor with q's device and dtype (autocast, where on, decides the dtype)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return x.new_empty((0,), dtype=dtype)


def _selector(seg: Tensor, n_rows: int) -> tuple[Tensor, Tensor | None]:
    """Token -> row of ``vec`` (and its one-hot, see SELECT); every dimension (tokens, samples) dynamic."""
    onehot = None
    if SELECT == "onehot" and n_rows <= ONEHOT_MAX_SAMPLES:
        onehot = _dynamic(torch.nn.functional.one_hot(seg, n_rows).float(), 0, 1)
    return _dynamic(seg), onehot


def _dynamic(t: Tensor, *dims: int) -> Tensor:
    # maybe_: a dimension that must be specialised (0 or 1 tokens or samples) compiles one
    # more graph instead of failing.
    for d in dims or (0,):
        torch._dynamo.maybe_mark_dynamic(t, d)
    return t


_FLAT: weakref.WeakKeyDictionary[Layout, FlatLayout] = weakref.WeakKeyDictionary()


def flat_layout(lay: Layout, n_rows: int, like: Tensor) -> FlatLayout:
    """The layout's flat view, made once per forward (every block of the forward shares it)."""
    flat = _FLAT.get(lay)
    if flat is None:
        if like.device.type == "cpu":
            _check_cpu_compiler()
        _announce()
        flat = _FLAT[lay] = FlatLayout(lay, n_rows, like)
    return flat


#: Graphs one half-block may hold. Dynamo's default (8) is met by a process that mixes
#: training, validation and sampling packs (with and without gradients, one sample, one
#: text token, past 64 samples, past 2048 tokens: each one graph more), and past it a
#: fullgraph compile fails the call instead of falling back. Each graph is compiled once.
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled(fn):
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = torch.compile(fn, fullgraph=True)

    @functools.wraps(fn)
    def call(*args):
        try:
            return compiled(*args)
        except Exception as exc:
            if _cannot_build(exc):  # a compiler that runs but cannot build (no Python headers, ...)
                raise MinfmError(
                    "model.denoiser.compile = true: inductor could not build its C++ kernels "
                    f"({first_line(_cannot_build(exc), 200)}); fix the compiler (CXX), or set compile = false"
                ) from None
            raise

    return call


def _cannot_build(exc: BaseException | None) -> BaseException | None:
    """Inductor's CppCompileError in ``exc``'s chain (matched by name: its module moves between
    torch releases), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ == "CppCompileError":
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@functools.cache
def _announce() -> None:
    """Say once (rank 0) why the first steps are slow: otherwise a run is silent while it compiles."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    print("minfm: compiling the FLUX blocks (model.denoiser.compile = true): the first steps wait for it, "
          "about a minute on a small CPU; inductor's cache makes later runs start faster", flush=True)


@functools.cache
def _check_cpu_compiler() -> None:
    """Inductor builds CPU kernels with a C++ compiler: say so plainly, before the first compile."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor's InvalidCxxCompiler, or an OSError probing it
        raise MinfmError(
            "model.denoiser.compile = true on CPU needs a C++ compiler for torch.compile "
            f"(inductor: {first_line(exc)}); install gcc (or set CXX), or set compile = false"
        ) from None


def double_block(block: DoubleStreamBlock, txt: Tensor, img: Tensor, vec: Tensor, lay: Layout):
    """The block on flat streams ``(L_txt, d)``, ``(L_img, d)`` (``Flux.run_blocks`` keeps them flat)."""
    f = flat_layout(lay, vec.shape[0], img)
    txt_f, img_f, vec = _dynamic(txt), _dynamic(img), _dynamic(vec)
    q, k, v = _compiled(type(block).attn_in)(
        block, txt_f, img_f, vec, f.txt_sel, f.img_sel, f.img_rot, f.cat_src, f.cat_inv
    )
    txt_f, img_f = _compiled(type(block).attn_out)(
        block, txt_f, img_f, vec, f.attend(lay, q, k, v), f.txt_sel, f.img_sel, f.cat_src, f.cat_inv
    )
    return txt_f, img_f


def single_block(block: SingleStreamBlock, x: Tensor, vec: Tensor, lay: Layout) -> Tensor:
    """The block on the flat pack ``(L, d)``."""
    f = flat_layout(lay, vec.shape[0], x)
    x_f, vec = _dynamic(x), _dynamic(vec)
    q, k, v, mlp = _compiled(type(block).attn_in)(block, x_f, vec, f.all_sel, f.all_rot, f.all_src, f.all_inv)
    out = _compiled(type(block).attn_out)(
        block, x_f, vec, f.attend(lay, q, k, v), _dynamic(mlp), f.all_sel, f.all_src, f.all_inv
    )
    return out
