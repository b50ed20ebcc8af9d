"""The plugin contract as code: what the engine passes to, and expects from, each component kind.

One :class:`typing.Protocol` per kind (``PROTOCOLS``) and, per kind, the keywords its
factory may receive (``FACTORY_KWARGS``). The engine uses only what is declared here;
docs/plugins.md is tested against this module, and :mod:`minfm_core.testing` checks a
component against it.

Optional capabilities are declared, never probed: a member marked ``@optional`` has a
body, the documented default that inheriting the protocol gives (e.g.
``class MyLogger(minfm_core.protocols.Logger)`` needs no ``set_total``). A component
that does not inherit must define every member itself.

No torch at module top: plugins may import this from their light hook modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image
    from torch import Tensor

#: What a ``Logger.log_images`` receives: one RGB ``PIL.Image.Image`` per caption.
IMAGE_TYPE = "PIL.Image.Image"

_REQUIRED = inspect.Parameter.empty

def optional(method: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a protocol member as optional: its body is the default a subclass inherits."""
    method.__minfm_optional__ = True  # type: ignore[attr-defined]
    return method


#: A latent's shape (C, F, H, W).
Shape = tuple[int, int, int, int]


@dataclass
class Patched:
    """What a patchifier's ``patchify`` returns and the engine consumes (hence in the core).

    Packed image tokens: ``tokens (L, C*pf*ph*pw)``, ``pos (L, 3)`` long as (t, y, x) in patch
    units, ``lens (n,)`` long, and each sample's latent ``shapes`` (C, F, H, W) for the inverse.
    Also importable from :mod:`minfm_core.packing`.
    """

    tokens: Tensor
    pos: Tensor
    lens: Tensor
    shapes: list[Shape]


@runtime_checkable
class Denoiser(Protocol):
    """An ``nn.Module`` predicting the velocity of packed image tokens.

    ``img (L_img, d_img)``, ``img_pos (L_img, 3)`` long (t, y, x), ``img_lens (n,)``,
    ``txt (L_txt, d_txt)``, ``txt_lens (n,)``, ``t (n,)`` in [0, 1] (1 = noise),
    ``vec (n, d_vec)`` or None, ``guidance (n,)`` or None -> a fresh floating-point
    ``(L_img, d_img)`` tensor, not ``img`` or a view of it (checked by the engine on every call).

    Initialisation is the factory's: ``factory(cfg, load_weights=True)`` returns the starting
    weights (pretrained, or the denoiser's own init drawn from torch's global generator, which
    the trainer seeds with ``run.seed``); the engine never re-initialises a built module.
    """

    def __call__(self, img: Tensor, img_pos: Tensor, img_lens: Tensor, txt: Tensor, txt_lens: Tensor,
                 t: Tensor, vec: Tensor | None = None, guidance: Tensor | None = None) -> Tensor: ...

    @optional
    def pretrained_state_dict(self) -> dict[str, Tensor] | None:
        """Optional (default: None, no pretrained weights): the configured weights as a checked
        state dict; callable on a meta-built module. Lets rank 0 stream them into the shards."""
        return None


@runtime_checkable
class Vae(Protocol):
    """Frozen autoencoder: images ``(3, F, H, W)`` in [-1, 1] <-> latents ``(C, F, h, w)``, sizes may mix.

    ``encode`` draws any randomness (a posterior sample) for image ``i`` from ``generators[i]``
    (CPU ``torch.Generator``s, one per image; the engine always passes them, seeded per
    sample, so a resumed run, another world size or micro-batch split encodes alike).
    """

    def encode(self, images: Sequence[Tensor], generators: Sequence[Any] | None = None) -> list[Tensor]: ...

    def decode(self, latents: Sequence[Tensor]) -> list[Tensor]: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Prompts -> ``(tokens (L, dim), lens (n,))`` packed, or ``(n, dim)`` when ``pooled``."""

    pooled: bool

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor] | Tensor: ...

    @optional
    def count_tokens(self, prompts: list[str]) -> list[int] | None:
        """Optional (default: None, "cannot tell without running the model"): how many tokens
        ``__call__`` gives each prompt (its ``lens``; 1 each when ``pooled``), counted without
        the model (a tokenizer, a word list, a table), also on a meta-built encoder
        (``load_weights=False``). Raise :class:`~minfm_core.errors.MinfmError` naming a prompt
        it cannot encode (a class table's unknown class): sampling, the demo and a run's
        galleries ask before any work starts, so such a prompt is refused up front instead of
        at its batch. ``minfm balance simulate`` counts a recipe's text tokens with it (with
        None, it draws them from a range)."""
        return None


@runtime_checkable
class Patchifier(Protocol):
    """Latents ``(C, F, H, W)`` (sizes may mix) <-> packed tokens (:class:`Patched`)."""

    def patchify(self, latents: Sequence[Tensor]) -> Patched: ...

    def unpatchify(self, tokens: Tensor, lens: Tensor, shapes: Sequence[Shape]) -> list[Tensor]: ...


@runtime_checkable
class ProbabilityPath(Protocol):
    """The noising rule ``x_t = noise(x0, eps, t)`` (``t`` per token, ``(L, 1)``) and target ``v``."""

    def noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor: ...

    def target(self, x0: Tensor, eps: Tensor) -> Tensor: ...


@runtime_checkable
class TimeSampler(Protocol):
    """Training times ``t (n,)``: a float tensor, every value finite and in [0, 1] (the engine
    refuses anything else, naming the sampler). The trainer calls it once per sample
    (``n = 1``) with that sample's own generator, so a sample's t does not depend on its batch.
    Validation does not call it (it uses fixed, stratified times)."""

    def __call__(self, n: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor: ...


@runtime_checkable
class TimeWarper(Protocol):
    """A per-sample shift of ``t (n,)`` from each sample's image token count ``seq_lens (n,)``;
    returns a float tensor ``(n,)`` in [0, 1] (checked by the engine, as a sampler's t)."""

    def __call__(self, t: Tensor, seq_lens: Tensor) -> Tensor: ...


@runtime_checkable
class TimeWeighter(Protocol):
    """Loss weights ``w (n,)`` for times ``t (n,)``: a float tensor (not a number), every value
    finite and >= 0 (checked by the engine: a negative weight trains away from the target)."""

    def __call__(self, t: Tensor) -> Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    """Integrates from t = 1 to 0; ``velocity(x_t, t_per_sample)`` returns packed velocities;
    ``callback(step, steps)`` after each step.

    ``generators`` holds one CPU ``torch.Generator`` per sample, in pack order (None: torch's
    global one). A stochastic sampler draws each sample's fresh noise from that sample's own
    generator (on the CPU, then moved to the tokens' device), so an image depends on its seed
    alone, not on which other images share its pack or in which order."""

    def __call__(self, velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, seq_lens: Tensor, *,
                 steps: int, warper: TimeWarper | None = None, generators: Sequence[torch.Generator] | None = None,
                 callback: Callable[[int, int], None] | None = None) -> Tensor: ...


@runtime_checkable
class Guidance(Protocol):
    """Combines conditional and unconditional velocities; ``needs_uncond`` False skips the second."""

    needs_uncond: bool

    def __call__(self, v_cond: Tensor, v_uncond: Tensor, lens: Tensor) -> Tensor: ...


@runtime_checkable
class Attention(Protocol):
    """Attention over packed sequences: ``q, k, v (L, heads, d_head)`` -> ``(L, heads, d_head)``."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor: ...


@runtime_checkable
class BalancerHandle(Protocol):
    """What a (non-``identity``) balancer's ``route`` returns last, besides anything of its own:
    for each routed chunk, in the order of the routed ``datum_lens``, the global index of its
    sample (chunks come in sample order) and where the chunk starts within that sample. A
    denoiser conditions each chunk on its sample and tells its text rows from its image rows
    with them (the built-in ``flux`` does)."""

    samples: Any  # integer numpy array (n_chunks,)
    offsets: Any  # integer numpy array (n_chunks,)


@runtime_checkable
class Balancer(Protocol):
    """Re-routes packed sequences across ranks (used by denoisers, see docs/balancer.md).

    ``identity`` True means routing is a no-op and a denoiser may skip it. Otherwise
    ``route``'s handle is a :class:`BalancerHandle`.
    """

    identity: bool

    def route(self, tokens: Tensor, datum_lens: Tensor, extras: Sequence[Tensor] = ()) -> tuple[Any, ...]: ...

    def reverse(self, tokens: Tensor, handle: Any) -> Tensor: ...

    @optional
    def attention(self, backend: Attention, handle: Any) -> Attention:
        """Optional for an ``identity`` balancer (default: ``backend``): the attention to call on
        routed tokens."""
        return backend

    @optional
    def gather_samples(self, tensors: Sequence[Tensor], handle: Any) -> list[Tensor]:
        """Optional for an ``identity`` balancer (default: ``tensors``): every rank's per-sample
        tensors ``(n_r, ...)`` as ``(B, ...)`` in global sample order."""
        return list(tensors)


@runtime_checkable
class Parallelizer(Protocol):
    """Shards a module over the ranks (and may bring mixed precision). With several processes
    the trained module arrives on the meta device; the engine then calls ``to_empty`` on what
    is returned and loads rank 0's weights into it, so return the module itself with its own
    state-dict names, and leave each rank's gradients the mean over the ranks
    (docs/plugins.md, register_parallelizers)."""

    def parallelize(self, module: torch.nn.Module, *, world_size: int, device: torch.device,
                    trainable: bool) -> torch.nn.Module: ...


@runtime_checkable
class Dataset(Protocol):
    """Map-style: items are dicts with ``"prompt"`` (a string) and either ``"image"``, a
    floating-point torch tensor ``(3, F, H, W)`` (RGB, frames, height, width) with every value
    in [-1, 1], or ``"latent"``, a floating-point ``(C, F, h, w)`` tensor. The engine checks each
    item it trains or validates on and refuses one that breaks these rules, naming the dataset,
    its plugin and the item's index. With ``train.dataloader_num_workers > 0``, ``__getitem__``
    and ``set_epoch`` run in processes forked after the dataset was built: an item depends only
    on its index, its epoch and the dataset's state at build time."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @optional
    def set_epoch(self, epoch: int) -> None:
        """Optional (default: nothing): called before each item with its epoch, in the process
        that loads it, so augmentations can vary per epoch."""

    @optional
    def prompt(self, index: int) -> str:
        """Optional (default: ``self[index]["prompt"]``): the prompt without loading the picture."""
        return self[index]["prompt"]


@runtime_checkable
class Logger(Protocol):
    """Metrics and images of a run (every rank builds one; only rank 0 should write)."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_images(self, step: int, name: str, images: list[Image], captions: list[str]) -> None: ...

    def close(self) -> None: ...

    @optional
    def set_total(self, total: int) -> None:
        """Optional (default: nothing): the planned number of steps, before the first ``log``."""


@runtime_checkable
class Source(Protocol):
    """A checkpoint-source resolver, registered by URI scheme without a config. The
    registered factory *is* the resolver: it is loaded, never called to build anything.

    ``training_state``: also the full training state (optimizer included), to resume.
    ``subpath``: not a checkpoint but one file or folder of the source ("" = its root), as
    pretrained weights are fetched; a folder brings its direct configs, safetensors and
    tokenizer files. A resolver that cannot do this raises :class:`MinfmError` saying so;
    one that has no local copy and may not download (offline) raises
    :class:`~minfm_core.errors.NotCachedError`.
    The hub plugin's ``hf`` source is how the core resolves ``org/name[@rev][/path]``."""

    def __call__(self, uri: str, *, training_state: bool = False, subpath: str | None = None) -> str | Path: ...


class Metric(Protocol):
    """An image metric: a distance between generated images and a fixed reference set,
    from per-image features. Registered without a config; the registered factory is called
    as ``factory(ref, *, extractor=None, weights=None, device="cpu")``."""

    def features(self, images: Any) -> Any:
        """uint8 (N, 3, H, W) images -> (N, D) numpy features."""

    def reference_features(self, *, batch_size: int, shard: tuple[int, int] = (0, 1)) -> Any:
        """(n, D) features of the reference batches ``i, i + k, ...`` for ``shard=(i, k)``."""

    def stats(self, features: Any) -> Any:
        """A summary of (N, D) features (the reference's is computed once and kept)."""

    def distance(self, samples: Any, reference: Any) -> float:
        """The metric between two summaries."""


@runtime_checkable
class VaeConfig(Protocol):
    """What a VAE's config must have: the engine sizes latents from it."""

    latent_channels: int
    compression: tuple[int, int, int]  # (frames, height, width)


@runtime_checkable
class PretrainedRefsConfig(Protocol):
    """A component config naming several pretrained references (``minfm cache models``)."""

    @property
    def pretrained_refs(self) -> tuple[str, ...]: ...


@runtime_checkable
class PretrainedConfig(Protocol):
    """A component config naming one pretrained reference (a string, "" for none)."""

    pretrained: str | None


@runtime_checkable
class CachedLatentsConfig(Protocol):
    """A dataset config that can read the latents ``minfm cache latents`` wrote, instead of
    its images: ``use_cached_latents`` turns it on, ``latents_dir`` (None: the run's
    ``latents/``) is where they are."""

    use_cached_latents: bool
    latents_dir: str | None


@runtime_checkable
class FlipConfig(Protocol):
    """A dataset config with random horizontal flips, ``p_flip`` in [0, 1]: the flips are
    drawn per epoch, so ``minfm cache latents`` encodes the images unflipped."""

    p_flip: float


@runtime_checkable
class NeedsCudaConfig(Protocol):
    """An attention backend config naming the jobs (``"train"``, ``"sample"``) it cannot run on
    the CPU: ``minfm check`` and a job's start refuse it there, before any work."""

    @property
    def needs_cuda(self) -> tuple[str, ...]: ...


@runtime_checkable
class GuidanceEmbedConfig(Protocol):
    """A denoiser config saying whether it embeds a distilled guidance scale (FLUX.1-dev's
    ``guidance_in``): without one, ``sample.distilled_guidance`` would be ignored, so it is refused."""

    guidance_embed: bool


@runtime_checkable
class RunOutputsConfig(Protocol):
    """A logger config naming what it writes in the run folder (relative names, a trailing
    ``/`` for a folder): probed before a run starts, so that a file in the way or a read-only
    one fails then, not at the first log line hours in. A name that is absolute, starts with
    ``~`` or holds a ``..`` is refused by ``minfm check`` and before the run (it would leave the
    run folder)."""

    @property
    def run_outputs(self) -> tuple[str, ...]: ...


#: Kind -> the protocol its built component satisfies.
PROTOCOLS: dict[str, type] = {
    "denoiser": Denoiser,
    "vae": Vae,
    "text_encoder": TextEncoder,
    "patchifier": Patchifier,
    "path": ProbabilityPath,
    "time_sampler": TimeSampler,
    "time_warper": TimeWarper,
    "time_weighter": TimeWeighter,
    "sampler": Sampler,
    "guidance": Guidance,
    "attention": Attention,
    "balancer": Balancer,
    "parallelizer": Parallelizer,
    "dataset": Dataset,
    "logger": Logger,
    "source": Source,
    "metric": Metric,
}

#: Kinds whose built weights stay frozen and are never saved in a checkpoint: training,
#: sampling and every process of a run build them anew from the config, so what they hold
#: must be a pure function of it. Their factories run with torch's global CPU generator
#: seeded with 0 (and restored after): a randomly initialised one (no ``pretrained``) comes
#: out the same everywhere, whatever was drawn before it.
FROZEN_KINDS = frozenset({"vae", "text_encoder"})

#: Kind -> every keyword the engine may pass the factory (name -> default; ``_REQUIRED`` when
#: the engine always passes it). The config instance comes first, positionally, when the
#: component has a config. A source's factory is the resolver itself (see :class:`Source`).
FACTORY_KWARGS: dict[str, dict[str, Any]] = {
    "denoiser": {"load_weights": True, "attention": None, "balancer": None},
    "vae": {"load_weights": True},
    "text_encoder": {"load_weights": True},
    "patchifier": {},
    "path": {},
    "time_sampler": {},
    "time_warper": {},
    "time_weighter": {},
    "sampler": {},
    "guidance": {},
    "attention": {},
    "balancer": {},  # the engine passes none (knapformer's own group= has a default)
    "parallelizer": {},
    "dataset": {"split": "train"},
    "logger": {"run_dir": _REQUIRED, "rank": 0, "recipe": None},
    "source": {"training_state": False, "subpath": None},
    "metric": {"extractor": None, "weights": None, "device": "cpu"},
}

#: Kinds registered without a config: the engine calls the factory itself (a source is the
#: resolver, a metric is built from ``FACTORY_KWARGS`` alone) and never structures a config
#: for it, so a config class given with one would be ignored; registering one is refused.
CONFIGLESS_KINDS: frozenset[str] = frozenset({"source", "metric"})

#: Kinds whose config the engine reads attributes of (fields or properties): checked when the
#: plugin registers, as without them the first batch failed with an AttributeError.
CONFIG_PROTOCOLS: dict[str, type] = {"vae": VaeConfig}


def config_lacks(kind: str, config: type | None) -> list[str]:
    """The attributes of ``kind``'s :data:`CONFIG_PROTOCOLS` entry that config class ``config``
    declares neither as a field nor as a class attribute (a property)."""
    import attrs

    proto = CONFIG_PROTOCOLS.get(kind)
    if proto is None:
        return []
    fields = attrs.fields_dict(config) if config is not None and attrs.has(config) else {}
    return [name for name in proto.__annotations__
            if name not in fields and (config is None or inspect.getattr_static(config, name, None) is None)]


#: Kind -> how ``minfm check`` builds the component a recipe selects (docs/plugins.md, "What
#: ``minfm check`` builds"), so that what the factory itself refuses (a ``MinfmError``) fails
#: the check as it would fail the run: ``"meta"``: ``factory(cfg, load_weights=False)`` inside
#: ``torch.device("meta")`` (structure only: no weights read, no memory; a denoiser gets no
#: ``attention`` and no ``balancer``); ``"plain"``: ``factory(cfg)`` as the engine calls it
#: (cheap kinds that read no data and no weights). Kinds not listed are never built by check:
#: a dataset reads data, a logger writes in the run folder, a balancer and a parallelizer are
#: built after the process group exists, sources and metrics fill no recipe slot.
CHECK_BUILDS: dict[str, str] = {
    "denoiser": "meta",
    "vae": "meta",
    "text_encoder": "meta",
    "patchifier": "plain",
    "path": "plain",
    "time_sampler": "plain",
    "time_warper": "plain",
    "time_weighter": "plain",
    "sampler": "plain",
    "guidance": "plain",
    "attention": "plain",
}


def members(kind: str) -> dict[str, bool]:
    """The protocol's members of ``kind``: name -> required (False: ``@optional``, with a default)."""
    proto = PROTOCOLS[kind]
    names = getattr(proto, "__protocol_attrs__", None) or _attrs(proto)
    return {n: not getattr(proto.__dict__.get(n), "__minfm_optional__", False) for n in sorted(names)}


def lacking(kind: str, obj: Any) -> str | None:
    """``"lacks a, b (...)"`` for the members of ``kind``'s protocol that ``obj`` does not have
    (what to do about them in the brackets), or None when it has them all."""
    every = members(kind)
    missing = [m for m in every if not hasattr(obj, m)]
    if not missing:
        return None
    required = [m for m in missing if every[m]]
    why = f"required: define {', '.join(required)}" if required else \
        f"inherit minfm_core.protocols.{PROTOCOLS[kind].__name__} for their defaults"
    return f"lacks {', '.join(missing)} ({why})"


def built_problem(kind: str, obj: Any) -> str | None:
    """``"built X ..."``: why what a factory of ``kind`` built cannot serve the engine (a
    member missing, bases that hide ``forward``, a keyword its methods do not take); None
    when it can. The one check of everything a factory builds."""
    lacks = lacking(kind, obj)
    if lacks:
        return f"built {type(obj).__name__} {lacks}"
    problem = bases_problem(kind, obj) or keywords_problem(kind, obj)
    return f"built {problem}" if problem else None


def keywords_problem(kind: str, obj: Any) -> str | None:
    """The keywords a method of ``kind``'s protocol declares (with a default, or keyword-only:
    ``Vae.encode``'s ``generators``, ``TimeSampler.__call__``'s ``generator``) that ``obj``'s
    method does not take: the engine passes them by name, so such a method would fail at its
    first call, mid-run. None when all are taken (or a signature cannot be read)."""
    proto = PROTOCOLS[kind]
    missing = []
    for name in members(kind):
        declared = proto.__dict__.get(name)
        if not callable(declared):
            continue
        wanted = [p.name for p in list(inspect.signature(declared).parameters.values())[1:]
                  if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)]
        method = getattr(obj, name, None)
        if name == "__call__" and hasattr(obj, "forward"):  # a torch module: called through forward
            method = obj.forward
        try:
            params = inspect.signature(method).parameters
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        missing += [f"{name}({k}=)" for k in wanted if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY]
    if not missing:
        return None
    return (f"{type(obj).__name__} does not take the keyword{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} that minfm_core.protocols.{proto.__name__} declares and the engine passes")


def bases_problem(kind: str, obj: Any) -> str | None:
    """Why a torch module of ``kind`` would not run its ``forward`` when called: a class listing
    the protocol before ``torch.nn.Module`` (``class Net(protocols.Denoiser, nn.Module)``) takes
    the protocol's ``__call__`` stub, and calling it returns None. None when it is fine."""
    import sys

    torch = sys.modules.get("torch")  # a torch module exists only once torch is imported
    if torch is None or not isinstance(obj, torch.nn.Module) or type(obj).__call__ is torch.nn.Module.__call__:
        return None
    return (f"{type(obj).__name__}: list torch.nn.Module before minfm_core.protocols.{PROTOCOLS[kind].__name__} "
            "in its bases, so that calling it runs forward")


def _attrs(proto: type) -> set[str]:
    # Python < 3.12 keeps the protocol's members only privately.
    from typing import _get_protocol_attrs  # type: ignore[attr-defined]

    return set(_get_protocol_attrs(proto))


def factory_problems(kind: str, factory: Callable[..., Any], has_config: bool) -> list[str]:
    """What keeps ``factory`` from being called the way the engine calls factories of ``kind``."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return []  # builtins without a signature: nothing to check
    params = list(sig.parameters.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    if kind in ("source", "metric"):  # called with the URI / the reference images first
        if not positional and not any(p.kind is p.VAR_POSITIONAL for p in params):
            problems.append(f"takes no positional argument for {'the URI' if kind == 'source' else 'the reference'}")
        positional = positional[1:]
    elif has_config:
        if not positional and not any(p.kind is p.VAR_POSITIONAL for p in params):
            problems.append("takes no positional argument for its config")
        positional = positional[1:]
    allowed = FACTORY_KWARGS[kind]
    by_name = {p.name: p for p in params}
    for name in allowed:
        p = by_name.get(name)
        if (p is None or p.kind is p.POSITIONAL_ONLY) and not var_kw:
            problems.append(f"does not accept the keyword {name}= the engine may pass")
    for p in params:
        # A parameter without default that is neither the config (or URI) nor a keyword the
        # engine always passes would make every engine call fail.
        needed = p.default is p.empty and (p in positional or p.kind is p.KEYWORD_ONLY)
        if needed and allowed.get(p.name, None) is not _REQUIRED:
            problems.append(f"requires {p.name!r}, which the engine never passes")
    return problems
