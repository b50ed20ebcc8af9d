"""Attention over packed sequences: ``backend(q, k, v, cu_seqlens, max_seqlen) -> out``.

``q, k, v`` are ``(L, H, D)`` with every sample's tokens packed one after another;
``cu_seqlens`` ``(n + 1,)`` int32 marks where samples start. A token attends to every
token of its own sample and to nothing else (bidirectional, no dropout, scale 1/sqrt(D)).
"""

from __future__ import annotations

import importlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from minfm_core.errors import MinfmError
from minfm_core.packing import positions_in_segment, segment_ids

_HALF = (torch.float16, torch.bfloat16)


def _lens(cu_seqlens: Tensor) -> list[int]:
    return cu_seqlens.diff().tolist()


#: Samples whose lengths are within this ratio share one padded sdpa call (see Sdpa).
BUCKET_RATIO = 1.125


def length_buckets(lens: list[int], ratio: float = BUCKET_RATIO) -> list[list[int]]:
    """Sample indices grouped so that, in each group, longest <= ratio x shortest (by length)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lens)), key=lens.__getitem__):
        if groups and lens[i] <= ratio * lens[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Sdpa:
    """Reference backend: ``scaled_dot_product_attention`` on the packed samples.

    A uniform batch is a single call with zero copies. Mixed lengths are bucketed
    (lengths within ``BUCKET_RATIO`` of each other), each bucket padded to its longest
    sample and run as one batched call with a key mask (padding is never attended to,
    and padded rows are dropped). Measured on CPU, forward + backward, 16 samples of
    257-393 tokens: one padded call per batch is 15x faster than one call per sample,
    and two buckets (~260 and ~390 tokens) take another ~25% off the padded call.
    """

    name = "sdpa"

    def __init__(self, cfg=None):
        self.cfg = cfg
        self._plan_key: Tensor | None = None
        self._plan: _PaddingPlan | None = None

    def plan(self, cu_seqlens: Tensor, device) -> _PaddingPlan:
        # Every layer of one forward passes the same cu_seqlens tensor: plan once per forward
        # (holding the tensor keeps its id from being reused by another).
        if cu_seqlens is not self._plan_key or self._plan.device != device:
            self._plan, self._plan_key = _PaddingPlan(cu_seqlens, device), cu_seqlens
        return self._plan

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        plan = self.plan(cu_seqlens, q.device)
        if plan.row is None:  # one length: a single batched call, no copies
            n, l = plan.uniform
            qb, kb, vb = (x.view(n, l, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
        # index_copy / index_select rather than advanced indexing: their backwards are a
        # gather and an index_add_, far cheaper on CPU than an accumulating index_put_.
        padded = [x.new_zeros((plan.rows, *x.shape[1:])).index_copy(0, plan.row, x) for x in (q, k, v)]
        return self.attend_padded(*padded, plan).index_select(0, plan.row)

    def padding_plan(self, cu_seqlens: Tensor, q: Tensor) -> _PaddingPlan | None:
        """The padded layout this backend runs mixed lengths in (None: it takes the pack as is).

        Compiled FLUX blocks (plugins/flux/compiled.py) write q/k/v straight into it and read
        the output from it, fusing the padding into their own gathers.
        """
        plan = self.plan(cu_seqlens, q.device)
        return None if plan.row is None else plan

    def attend_padded(self, q: Tensor, k: Tensor, v: Tensor, plan: _PaddingPlan) -> Tensor:
        """Attention on ``(plan.rows, H, D)`` blocks laid out as ``plan`` says (padding rows: anything)."""
        # split, not slices: the backward of a split is one cat of the buckets' gradients,
        # where every slice's backward zero-fills a whole (rows, H, D) buffer and adds it up.
        sizes = [n * longest for n, longest, _ in plan.buckets]
        outs = []
        for (n, longest, keep), qb, kb, vb in zip(plan.buckets, *(x.split(sizes) for x in (q, k, v))):
            qb, kb, vb = (x.unflatten(0, (n, longest)).transpose(1, 2) for x in (qb, kb, vb))
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=keep).transpose(1, 2).flatten(0, 1))
        return torch.cat(outs)


class _PaddingPlan:
    """Where each packed token goes in the buckets' padded blocks, and each bucket's key mask.

    The blocks (n_b x longest_b rows each) lie one after another in a flat buffer of ``rows``.
    """

    def __init__(self, cu_seqlens: Tensor, device) -> None:
        lens = _lens(cu_seqlens)
        self.device, self.row = device, None
        if len(set(lens)) == 1:
            self.uniform = (len(lens), lens[0])
            return
        base, self.buckets, self.rows = [0] * len(lens), [], 0
        for group in length_buckets(lens):
            blens = [lens[i] for i in group]
            longest = max(blens)
            for j, i in enumerate(group):
                base[i] = self.rows + j * longest
            keep = None
            if min(blens) < longest:
                keep = (torch.arange(longest, device=device)[None, :] < torch.tensor(blens, device=device)[:, None])
                keep = keep[:, None, None, :]
            self.buckets.append((len(group), longest, keep))
            self.rows += len(group) * longest
        lt = cu_seqlens.diff().to(device)
        self.row = positions_in_segment(lt) + torch.tensor(base, device=device)[segment_ids(lt)]


def _needs_half(name: str, q: Tensor) -> None:
    if q.device.type != "cuda":
        raise MinfmError(f"attention backend {name!r} needs CUDA tensors, got {q.device}; use 'sdpa' or 'auto'")
    if q.dtype not in _HALF:
        raise MinfmError(
            f"attention backend {name!r} needs float16/bfloat16 inputs, got {q.dtype}; "
            "train under bf16 autocast or use 'sdpa' / 'auto'"
        )


def _import(module: str, name: str, hint: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MinfmError(f"attention backend {name!r} is not available: {exc}; {hint}") from None


class _VarlenKernel:
    """A CUDA varlen kernel called as ``fn(q, k, v, cu_q, cu_k, max_q, max_k)``, imported on first use."""

    name = module = attr = hint = ""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self._fn = None

    def __call__(self, q, k, v, cu_seqlens, max_seqlen):
        _needs_half(self.name, q)
        if self._fn is None:
            self._fn = getattr(_import(self.module, self.name, self.hint), self.attr)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        out = self._fn(q, k, v, cu, cu, max_seqlen, max_seqlen)
        # Some FA3 releases return (out, softmax_lse).
        return out[0] if isinstance(out, tuple) else out


class FlashAttn(_VarlenKernel):
    """flash-attn 2: ``flash_attn.flash_attn_varlen_func``."""

    name, module, attr, hint = "flash_attn", "flash_attn", "flash_attn_varlen_func", "pip install flash-attn"


class FlashAttn3(_VarlenKernel):
    """flash-attn 3 (Hopper): ``flash_attn_interface.flash_attn_varlen_func``."""

    name, module, attr = "flash_attn3", "flash_attn_interface", "flash_attn_varlen_func"
    hint = "build flash-attention's hopper/ package"


class TorchVarlen(_VarlenKernel):
    """PyTorch's varlen flash kernel: ``torch.nn.attention.varlen.varlen_attn``."""

    name, module, attr = "torch_varlen", "torch.nn.attention.varlen", "varlen_attn"
    hint = f"torch {torch.__version__} has no varlen attention"


#: Devices whose flex_attention has a forward but no backward (torch refuses inputs that require grad).
_NO_FLEX_BACKWARD = ("cpu", "mps")


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


class Flex:
    """flex_attention over the whole pack with a block-diagonal (same-sample) mask.

    The block mask depends only on ``cu_seqlens``; every layer of one forward shares
    it, so the last one is cached.
    """

    name = "flex"

    def __init__(self, cfg=None):
        self.cfg = cfg
        self._mask_key = None
        self._mask_cu: Tensor | None = None
        self._mask = None

    def _block_mask(self, cu_seqlens: Tensor, L: int, device):
        from torch.nn.attention.flex_attention import create_block_mask

        if cu_seqlens is self._mask_cu:  # the other layers of the same forward: no device sync
            return self._mask
        key = (tuple(cu_seqlens.tolist()), str(device))
        self._mask_cu = cu_seqlens
        if key != self._mask_key:
            lens = cu_seqlens.diff().to(device)
            doc = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens.long())

            def same_sample(b, h, q_idx, kv_idx):
                return doc[q_idx] == doc[kv_idx]

            self._mask = create_block_mask(same_sample, None, None, L, L, device=device)
            self._mask_key = key
        return self._mask

    def __call__(self, q, k, v, cu_seqlens, max_seqlen):
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:
            raise MinfmError(f"attention backend 'flex' is not available in torch {torch.__version__}") from None
        if q.device.type in _NO_FLEX_BACKWARD and any(x.requires_grad for x in (q, k, v)):
            if torch.is_grad_enabled():  # flex_attention's NotImplementedError, as a line to act on
                raise MinfmError(f"attention backend 'flex' cannot train on {q.device.type} tensors "
                                 "(flex_attention has no backward there); use 'sdpa' or 'auto'")
            q, k, v = (x.detach() for x in (q, k, v))  # no gradient wanted: the forward runs there
        L = q.shape[0]
        mask = self._block_mask(cu_seqlens, L, q.device)
        fn = _compiled_flex() if (self.cfg is None or self.cfg.compile) else flex_attention
        qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        return fn(qb, kb, vb, block_mask=mask)[0].transpose(0, 1)


#: Order in which ``auto`` tries CUDA kernels, fastest first. flex is left out: its
#: compiled kernel re-specialises as packed lengths change from batch to batch.
AUTO_ORDER = ("flash_attn3", "flash_attn", "torch_varlen")
BACKENDS = {"sdpa": Sdpa, "flash_attn": FlashAttn, "flash_attn3": FlashAttn3, "torch_varlen": TorchVarlen, "flex": Flex}


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine's CUDA device (None: it can)."""
    if name == "sdpa":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        if name == "flash_attn":
            importlib.import_module("flash_attn")
        elif name == "flash_attn3":
            if torch.cuda.get_device_capability()[0] != 9:
                return "flash-attn 3 needs a Hopper (sm90) GPU"
            importlib.import_module("flash_attn_interface")
        elif name == "torch_varlen":
            importlib.import_module("torch.nn.attention.varlen")
        elif name == "flex":
            importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class Auto:
    """Picks per call: sdpa for CPU or float32 tensors, else the first available of AUTO_ORDER."""

    name = "auto"

    def __init__(self, cfg=None):
        self.cfg = cfg
        self._sdpa = Sdpa()
        self._cuda = None

    @property
    def cuda_choice(self):
        if self._cuda is None:
            pick = next((n for n in AUTO_ORDER if unavailable_reason(n) is None), "sdpa")
            self._cuda = BACKENDS[pick]()
        return self._cuda

    def __call__(self, q, k, v, cu_seqlens, max_seqlen):
        if q.device.type != "cuda" or q.dtype not in _HALF:
            return self._sdpa(q, k, v, cu_seqlens, max_seqlen)
        return self.cuda_choice(q, k, v, cu_seqlens, max_seqlen)

    def padding_plan(self, cu_seqlens: Tensor, q: Tensor):
        """sdpa's padded layout where sdpa runs (see Sdpa.padding_plan); None for the CUDA kernels."""
        if q.device.type != "cuda" or q.dtype not in _HALF:
            return self._sdpa.padding_plan(cu_seqlens, q)
        return None

    def attend_padded(self, q, k, v, plan):
        return self._sdpa.attend_padded(q, k, v, plan)
