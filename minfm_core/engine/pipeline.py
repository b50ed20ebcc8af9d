"""The model side of a run: frozen operators, the denoiser, and how a batch becomes tokens.

``Pipeline`` holds every built component of a recipe. Training and sampling both go
through it, so a sample drawn in training and one drawn by ``minfm sample`` are made
by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import boundary, packing
from ..errors import MinfmError, PluginError
from .runtime import POSTERIOR_STREAM, derived_seed


@dataclass
class TextBatch:
    txt: Tensor  # (L_txt, d_txt) packed
    txt_lens: Tensor  # (n,)
    vec: Tensor | None  # (n, d_vec)


@dataclass
class Pipeline:
    """Built components of a recipe (frozen ones in eval mode, no grad)."""

    denoiser: torch.nn.Module
    vae: Any
    patchifier: Any
    text_encoder: Any
    clip_encoder: Any
    path: Any
    time_sampler: Any
    time_warper: Any
    time_weighter: Any
    sampler: Any
    guidance: Any
    sample_warper: Any
    device: torch.device
    resolved: Any = field(repr=False, default=None)
    #: What the engine read the values of on a device other than the CPU (see read_values).
    _values_read: set[str] = field(repr=False, default_factory=set)

    # ---- what components hand the engine (minfm_core.boundary) ------------------------
    def who(self, path: str) -> str:
        """``flow.time_sampler: time_sampler 'beta' of plugin 'x'`` (what an error names)."""
        return self.resolved.who(path) if self.resolved is not None else path

    def read_values(self, x: Any, key: str) -> bool:
        """Whether to check ``x``'s values now: always on the CPU, where it costs a pass over a
        small tensor; on a GPU only the first time per ``key``, as reading them there waits
        for the device (and every step would)."""
        if not isinstance(x, Tensor) or x.device.type == "cpu":
            return True
        if key in self._values_read:
            return False
        self._values_read.add(key)
        return True

    def refuse(self, path: str, what: str, problem: str | None) -> None:
        """Raise the one-line error naming the component (and its plugin) in ``path`` when a
        value it returned breaks its protocol (``problem`` from :mod:`minfm_core.boundary`)."""
        if problem is not None:
            raise PluginError(f"{self.who(path)}: {what}: {problem}")

    def check_samples(self, samples: list[dict], indices: list[int] | None = None) -> None:
        """Every dataset item of a batch keeps protocols.Dataset's rules, named by its dataset
        index (``indices``, else the key the training loader adds), before anything reads it:
        a uint8 image in 0..255 trained on garbage, a (3, H, W) one was blamed on the VAE as
        "image 0" (its place in the batch)."""
        for k, s in enumerate(samples):
            image = s.get("image") if isinstance(s, dict) else None
            problem = boundary.item_problem(s, values=self.read_values(image, "data"))
            if problem is not None:
                if indices is not None:
                    where = f"item {indices[k]}"
                elif isinstance(s, dict) and "index" in s:
                    where = f"item {s['index']}"
                else:
                    where = f"item {k} of a batch"
                self.refuse("data", where, problem)

    def check_prompts(self, prompts: list[str], what: str) -> None:
        """Ask the text encoders to count ``prompts`` (``TextEncoder.count_tokens``) before any
        work: a prompt one cannot encode (a class table's unknown class) is refused now, named
        by ``what`` (the flag or recipe key it came from), not when its batch is drawn."""
        for path, enc in (("model.text_encoder", self.text_encoder), ("model.clip_encoder", self.clip_encoder)):
            if enc is not None:
                counted_tokens(enc, self.who(path), prompts, what)

    def check_patched(self, patched: Any, n: int) -> None:
        """What the patchifier made of ``n`` latents keeps protocols.Patched's rules: a tuple
        failed as an AttributeError blamed on minFM, float positions trained silently."""
        values = self.read_values(getattr(patched, "lens", None), "model.patchifier")
        self.refuse("model.patchifier", "patched = patchify(latents)", boundary.patched_problem(patched, n, values=values))

    # ---- frozen operators -------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextBatch:
        if self.text_encoder is None:
            raise MinfmError("model.text_encoder: the denoiser needs a text encoder")
        txt, lens = self._encoded("model.text_encoder", self.text_encoder, prompts)
        vec = self._encoded("model.clip_encoder", self.clip_encoder, prompts) if self.clip_encoder is not None else None
        return TextBatch(
            txt.to(self.device, torch.float32), lens.to(self.device), None if vec is None else vec.to(self.device, torch.float32)
        )

    def _encoded(self, path: str, enc: Any, prompts: list[str]):
        """``enc(prompts)``, checked (shape, dtype: free): a wrong width failed in the denoiser's
        first matmul, blamed on minFM."""
        out = enc(prompts)
        dim = getattr(self.resolved.config(path), "dim", None) if self.resolved is not None else None
        self.refuse(path, "enc(prompts)", boundary.text_problem(out, len(prompts), dim, enc.pooled))
        return out

    @torch.no_grad()
    def encode_images(self, samples: list[dict], generators: list[torch.Generator]) -> list[Tensor]:
        """Latents for a list of samples (cached ``latent`` entries pass straight through);
        sample i's posterior noise, if the VAE draws any, from ``generators[i]``."""
        out: list[Tensor | None] = [s.get("latent") for s in samples]
        vae_cfg = self.resolved.config("model.vae")
        for x in out:
            if x is not None:
                check_cached_latent(x, vae_cfg.latent_channels, tuple(vae_cfg.compression))
        todo = [i for i, x in enumerate(out) if x is None]
        if todo:
            images = [samples[i]["image"].to(self.device) for i in todo]
            latents = encode_latents(self.vae, self.resolved["model.vae"], images, [generators[i] for i in todo])
            for i, lat in zip(todo, latents):
                out[i] = lat
        return [x.to(self.device, torch.float32) for x in out]  # type: ignore[union-attr]

    def latent_shape(self, size: tuple[int, int, int]) -> tuple[int, int, int, int]:
        """(C, F, h, w) of the latent for an image of (frames, height, width)."""
        cfg = self.resolved.config("model.vae")
        _, ch, cw = cfg.compression
        if size[1] % ch or size[2] % cw:
            raise MinfmError(f"size {size[1]}x{size[2]}: height and width must be multiples of the VAE's "
                             f"{ch}x{cw} compression")
        return boundary.latent_shape(cfg.latent_channels, cfg.compression, size, floor=True)

    # ---- denoiser calls ---------------------------------------------------------
    def velocity(self, x: Tensor, pos: Tensor, lens: Tensor, text: TextBatch, t: Tensor, guidance: Tensor | None = None):
        v = self.denoiser(x, pos, lens, text.txt, text.txt_lens, t, vec=text.vec, guidance=guidance)
        # type, shape and storage only (free): a tuple or a short tensor crashed in the loss
        # with a traceback, the input handed back failed in backward
        self.refuse("model.denoiser", "v = model(img, ...)", boundary.velocity_problem(v, x))
        return v


def encode_latents(vae: Any, slot: Any, images: list[Tensor], generators: list[torch.Generator]) -> list[Tensor]:
    """``vae.encode(images, generators=generators)``, each latent checked against the shape the
    VAE's config (``slot``: the recipe's ``model.vae``) promises: one of another width failed
    in the patchifier or the denoiser's first matmul, blamed on minFM."""
    latents = vae.encode(images, generators=generators)
    problem = boundary.latents_problem(latents, images, slot.config)
    if problem is not None:
        raise PluginError(f"{slot.path}: {slot.component.describe()}: latents = vae.encode(images, ...): {problem}")
    return latents


def counted_tokens(enc: Any, who: str, prompts: list[str], what: str) -> list[int] | None:
    """``enc.count_tokens(prompts)`` as the engine takes it: the encoder's refusal of a prompt is
    one MinfmError named by ``what``; an answer that breaks the protocol, the PluginError of
    ``who`` (the component, as :meth:`Pipeline.who` names it)."""
    try:
        counts = enc.count_tokens(list(prompts))
    except PluginError:
        raise
    except MinfmError as exc:
        raise MinfmError(f"{what}: {exc}") from None
    problem = boundary.counts_problem(counts, len(prompts))
    if problem is not None:
        raise PluginError(f"{who}: count_tokens(prompts): {problem}")
    return counts


def shard(resolved, module: torch.nn.Module, *, world_size: int, device: torch.device, trainable: bool):
    """Spread ``module`` over the ranks with the recipe's parallelizer.

    A trainable module is wrapped even in a world of one (the parallelizer also brings mixed
    precision); a frozen one only when there is something to shard it over.
    """
    slot = resolved.get("parallel")
    if slot is None or slot.component.name == "none" or (world_size == 1 and not trainable):
        return module
    names = set(module.state_dict())
    out = slot.build().parallelize(module, world_size=world_size, device=device, trainable=trainable)
    # Checkpoints, the EMA and the weights broadcast from rank 0 are keyed by the module's
    # own names: a wrapper adding `module.` trained, then could not be sampled from.
    got = set(out.state_dict()) if isinstance(out, torch.nn.Module) else None
    if got != names:
        if got is None:
            what = f"returned {type(out).__name__}, not a module"
        else:
            first = min(got - names) if got - names else min(names - got)
            what = f"changed the state-dict names ({first!r}, ...)"
        raise PluginError(f"{slot.path}: {slot.component.describe()}: parallelize {what}; it must return the module with the "
                          "names it had (shard it in place, as fully_shard does; docs/plugins.md, register_parallelizers)")
    return out


# Frozen modules sharded forward-only when the recipe shards (as the seed did for T5 / CLIP:
# T5-XXL does not fit unsharded next to FLUX-dev on one GPU).
SHARDED_FROZEN = ("model.text_encoder", "model.clip_encoder")


class CheckedAttention:
    """The recipe's attention backend as the engine hands it to the denoiser: each call's
    output is checked to be shaped like ``q`` (free; a wrong one failed in the denoiser's next
    matmul, blamed on minFM). Anything else the denoiser reads of the backend (an optional
    fast path, docs/flux.md) is the backend's own."""

    def __init__(self, backend: Any, who: str) -> None:
        self.backend, self.who = backend, who

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        out = self.backend(q, k, v, cu_seqlens, max_seqlen)
        problem = boundary.attention_problem(out, q)
        if problem is not None:
            raise PluginError(f"{self.who}: out = attention(q, k, v, cu_seqlens, max_seqlen): {problem}")
        return out

    def __getattr__(self, name: str) -> Any:
        if name == "backend":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __repr__(self) -> str:
        return repr(self.backend)


def denoiser_kwargs(resolved, *, balancer: bool = True) -> dict:
    """What the denoiser factory gets besides its config: the attention backend and balancer."""
    kwargs = {"attention": CheckedAttention(resolved.build("model.attention"), resolved.who("model.attention"))}
    slot = resolved.get("balancer")
    if balancer and slot is not None and slot.component.name != "none":
        # Built after the process group exists, on every rank: the balancer makes its own groups.
        kwargs["balancer"] = slot.build()
    return kwargs


def sharded_denoiser(
    resolved, *, world_size: int, device: torch.device, rank: int, trainable: bool = True
) -> torch.nn.Module:
    """The denoiser built on the meta device, sharded, then filled from rank 0.

    Every other rank only ever holds its shards. Pretrained weights (a denoiser whose
    module defines ``pretrained_state_dict()``, returning a state dict or None) stream from
    rank 0's memory-mapped files, one tensor at a time: no rank materialises the whole
    model (FLUX.1-dev in float32 would be 48 GB). Without them rank 0 builds one full copy
    in CPU memory with the seed's initialisation. Either way the weights equal those of a
    single-process build with the same seed. (``pretrained_state_dict`` is declared by
    :class:`minfm_core.protocols.Denoiser`.)
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    slot = resolved["model.denoiser"]
    with torch.device("meta"):
        model = slot.build(load_weights=False, **denoiser_kwargs(resolved))
    full = {}
    if rank == 0:
        full = model.pretrained_state_dict()  # a declared Denoiser member (default: None)
        if full is None:
            full = slot.build(load_weights=True, **denoiser_kwargs(resolved, balancer=False)).state_dict()
    model = shard(resolved, model, world_size=world_size, device=device, trainable=trainable)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def build_pipeline(
    resolved, device: torch.device, *, load_weights: bool = True, denoiser: torch.nn.Module | None = None,
    world_size: int = 1,
) -> Pipeline:
    """Build every component of a resolved recipe on ``device``.

    With ``world_size > 1`` and a sharding parallelizer, the text encoders are sharded for
    forward-only use; every rank must then call them equally often (the engines do).
    """

    def frozen(path: str):
        slot = resolved.get(path)
        if slot is None:
            return None
        module = slot.build(load_weights=load_weights)
        if isinstance(module, torch.nn.Module):
            module = module.to(device).eval().requires_grad_(False)
            if path in SHARDED_FROZEN:
                module = shard(resolved, module, world_size=world_size, device=device, trainable=False)
        return module

    def plain(path: str):
        slot = resolved.get(path)
        return None if slot is None else slot.build()

    if denoiser is None:
        denoiser = resolved["model.denoiser"].build(load_weights=load_weights, **denoiser_kwargs(resolved)).to(device)
    flow_warper = plain("flow.time_warper")
    sample_warper = plain("sample.time_warper") if resolved.get("sample.time_warper") else flow_warper
    return Pipeline(
        denoiser=denoiser,
        vae=frozen("model.vae"),
        patchifier=plain("model.patchifier"),
        text_encoder=frozen("model.text_encoder"),
        clip_encoder=frozen("model.clip_encoder"),
        path=plain("flow.path"),
        time_sampler=plain("flow.time_sampler"),
        time_warper=flow_warper,
        time_weighter=plain("flow.time_weighter"),
        sampler=plain("sample.sampler"),
        guidance=plain("sample.guidance"),
        sample_warper=sample_warper,
        device=device,
        resolved=resolved,
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, index, 0x5EED]).generate_state(1)[0])


@dataclass
class TrainInputs:
    """One micro-batch, ready for the denoiser."""

    x_t: Tensor
    pos: Tensor
    lens: Tensor
    target: Tensor
    t: Tensor
    weight: Tensor
    text: TextBatch
    n_tokens: int


def prepare_batch(
    p: Pipeline,
    samples: list[dict],
    generator: torch.Generator,
    text_dropout: float,
    t: Tensor | None = None,
    noise_seeds: list[int] | None = None,
    seed: int = 0,
    indices: list[int] | None = None,
) -> TrainInputs:
    """Frozen ops -> patchify -> time sampling and warping -> noising, for one micro-batch.

    All randomness comes from ``generator`` (a CPU generator owned by the trainer), so
    a resumed run draws exactly what an uninterrupted one would. ``indices``: the samples'
    dataset indices, for errors only, where the samples carry none (validation's).
    """
    n = len(samples)
    p.check_samples(samples, indices)
    prompts = [s["prompt"] for s in samples]
    keyed = noise_seeds is None and t is None and all("index" in s for s in samples)
    if keyed:
        # Randomness per sample, from (seed, epoch, index): identical at any world size or
        # micro-batch split, and a resumed run needs no generator state to continue exactly.
        gens = [torch.Generator().manual_seed(sample_seed(seed, s["epoch"], s["index"])) for s in samples]
        drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < text_dropout
        vae_gens = gens
    else:
        drop = torch.rand(n, generator=generator) < text_dropout
        # from validation's fixed noise seeds, another stream: its posterior noise is not its path noise
        vae_gens = ([generator] * n if noise_seeds is None else
                    [torch.Generator().manual_seed(derived_seed(s, POSTERIOR_STREAM)) for s in noise_seeds])
    prompts = ["" if d else pr for pr, d in zip(prompts, drop.tolist())]
    text = p.encode_text(prompts)
    latents = p.encode_images(samples, vae_gens)  # its refusals of a cached latent say what is wrong
    try:
        patched = p.patchifier.patchify(latents)
    except MinfmError as exc:
        if not any("latent" in s for s in samples):
            raise
        # the recipe's sizes were checked against the patch; a cache made before they changed was not
        raise MinfmError(f"data: a cached latent (data.latents_dir) does not fit model.patchifier: {exc}; "
                         "was the cache made at other sizes? (remake it: minfm cache latents)") from None
    p.check_patched(patched, n)
    x0 = patched.tokens.to(p.device, torch.float32)
    lens = patched.lens.to(p.device)
    if t is None and keyed:
        drawn = [p.time_sampler(1, generator=g) for g in gens]
        for one in drawn:  # type and shape: free
            p.refuse("flow.time_sampler", "t = sampler(1)", boundary.times_problem(one, 1, values=False))
        t = torch.cat([one.cpu() for one in drawn])
        p.refuse("flow.time_sampler", "t = sampler(1)", boundary.times_problem(t, n))  # values, on the CPU
        t = _warped(p, t.to(p.device), lens)
    elif t is None:  # (a fixed t, validation's, is used as given, unwarped)
        t = p.time_sampler(n, generator=generator)
        p.refuse("flow.time_sampler", f"t = sampler({n})",
                 boundary.times_problem(t, n, values=p.read_values(t, "flow.time_sampler")))
        t = _warped(p, t.to(p.device), lens)
    t = t.to(p.device, torch.float32)
    if keyed:
        eps = torch.cat([torch.randn((int(l), x0.shape[1]), generator=g) for l, g in zip(lens.tolist(), gens)])
    elif noise_seeds is None:
        eps = torch.randn(x0.shape, generator=generator)
    else:  # per-sample noise, independent of how samples are batched (validation)
        eps = torch.cat([
            torch.randn((int(l), x0.shape[1]), generator=torch.Generator().manual_seed(s))
            for l, s in zip(lens.tolist(), noise_seeds)
        ])
    eps = eps.to(p.device)
    t_tok = packing.expand_per_token(t, lens).unsqueeze(-1)
    x_t = p.path.noise(x0, eps, t_tok)
    p.refuse("flow.path", "x_t = path.noise(x0, eps, t)", boundary.shaped_like_problem(x_t, x0))
    target = p.path.target(x0, eps)
    p.refuse("flow.path", "v = path.target(x0, eps)", boundary.shaped_like_problem(target, x0))
    if p.time_weighter is not None:
        weight = p.time_weighter(t)
        p.refuse("flow.time_weighter", "w = weighter(t)",
                 boundary.weights_problem(weight, n, values=p.read_values(weight, "flow.time_weighter")))
    else:
        weight = torch.ones_like(t)
    return TrainInputs(
        x_t=x_t, pos=patched.pos.to(p.device), lens=lens, target=target, t=t, weight=weight, text=text,
        n_tokens=int(lens.sum()) + int(text.txt_lens.sum()),
    )


def _warped(p: Pipeline, t: Tensor, lens: Tensor) -> Tensor:
    """The recipe's time warper applied to training times, its output checked."""
    if p.time_warper is None:
        return t
    out = p.time_warper(t, lens)
    p.refuse("flow.time_warper", "t = warper(t, seq_lens)",
             boundary.times_problem(out, len(t), values=p.read_values(out, "flow.time_warper")))
    return out


def per_sample_loss(p: Pipeline, batch: TrainInputs) -> Tensor:
    """Per-sample mean squared velocity error ``(n,)`` (unweighted)."""
    v = p.velocity(batch.x_t, batch.pos, batch.lens, batch.text, batch.t)
    err = (v.float() - batch.target.float()).pow(2).mean(-1)
    return packing.segment_mean(err, batch.lens)


def check_cached_latent(x: Tensor, channels: int, compression: tuple[int, int, int]) -> None:
    """A cached latent (C, F, h, w) the model can take: the VAE's channels (a cache made with
    another VAE ended in a matmul's shape error), and a picture no larger than any picture
    minFM reads: at most MAX_SIDE a side and PIL's MAX_IMAGE_PIXELS a frame once decoded, at
    most MAX_FRAMES frames. A cache is a folder of files (perhaps downloaded): a 12 MB shard
    of one 1024 x 1024 latent held the first step of a tiny model for over ten minutes."""
    from PIL import Image

    from ..validators import MAX_FRAMES, MAX_SIDE

    if x.shape[0] != channels:
        raise MinfmError(f"data: a cached latent has {x.shape[0]} channels, but model.vae makes {channels}: "
                         "was the cache (data.latents_dir) made with another VAE? (minfm cache latents)")
    ct, ch, cw = compression
    frames, height, width = (x.shape[1] - 1) * ct + 1, x.shape[2] * ch, x.shape[3] * cw
    limit = Image.MAX_IMAGE_PIXELS
    if frames > MAX_FRAMES or max(height, width) > MAX_SIDE or (limit is not None and height * width > limit):
        raise MinfmError(f"data: a cached latent of shape {tuple(x.shape)} is {frames} frame(s) of {width}x{height} "
                         f"pixels decoded (model.vae compresses {ct}x{ch}x{cw}); at most {MAX_FRAMES} frames of "
                         f"{MAX_SIDE} pixels a side and {int(limit or 0):,} pixels are read: was the cache "
                         "(data.latents_dir) made for another data size? (minfm cache latents)")
