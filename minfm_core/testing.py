"""A conformance kit for plugin authors: check a component against :mod:`minfm_core.protocols`.

``check_<kind>(component_or_factory, config)`` (one per kind, e.g. :func:`check_time_sampler`)
checks the factory's signature against the keywords the engine passes, builds the component
(on the meta device where building could be heavy), checks the protocol's members and, where
it is cheap on a CPU, makes one small call and checks what comes back (with the engine's own
checks, :mod:`minfm_core.boundary`: what passes here is what a run accepts). It returns the
built object and raises ``AssertionError`` naming what is wrong.

:func:`isolated_registry` registers only the plugins under test, with no entry points loaded
(autoload off): the installed copy of the plugin being tested cannot collide with it. For
pytest, add ``pytest_plugins = ["minfm_core.testing"]`` to a conftest.py and use the
``minfm_registry`` fixture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from . import boundary, protocols
from .errors import MinfmError, PluginError
from .config import FieldTypeError
from .components import frozen_build_rng
from .registry import Component, Registry

__all__ = [  # a test keeps one check per kind here
    "check_attention",
    "check_balancer",
    "check_component",
    "check_dataset",
    "check_denoiser",
    "check_guidance",
    "check_logger",
    "check_metric",
    "check_parallelizer",
    "check_patchifier",
    "check_path",
    "check_sampler",
    "check_source",
    "check_text_encoder",
    "check_time_sampler",
    "check_time_warper",
    "check_time_weighter",
    "check_vae",
    "isolated_registry",
    "minfm_registry",
    "reference_attention",
]


# ---- an isolated registry ------------------------------------------------------------------


@contextlib.contextmanager
def isolated_registry(*plugins: Any) -> Iterator[Registry]:
    """The process-wide registry holds only ``plugins`` inside the block (no entry points).

    Each plugin is a module or object holding ``@hookimpl`` functions, or a ``(name, plugin)``
    pair. The previous registry comes back on exit, even on failure.
    """
    from .plugins import only

    named = [entry if isinstance(entry, tuple) else (_plugin_name(entry), entry) for entry in plugins]
    stack = contextlib.ExitStack()
    try:
        state = stack.enter_context(only(*named))
    except PluginError as exc:  # a plugin under test that cannot register fails the test
        raise AssertionError(str(exc)) from None
    with stack:
        yield state.registry


def _plugin_name(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


try:
    import pytest
except ImportError:  # the kit works without pytest; only the fixture needs it
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def minfm_registry() -> Iterator[Callable[..., Registry]]:
        """``minfm_registry(*plugins)`` -> an isolated registry for the rest of the test."""
        with contextlib.ExitStack() as stack:
            yield lambda *plugins: stack.enter_context(isolated_registry(*plugins))


# ---- the checks ----------------------------------------------------------------------------


def check_component(kind: str, component: Component | Callable[..., Any], config: Any = None, **kwargs: Any) -> Any:
    """Run ``check_<kind>``: ``component`` is a registered :class:`Component` or a bare factory."""
    return _CHECKS[kind](component, config, **kwargs)


def _factory(kind: str, component: Component | Callable[..., Any], config: Any) -> tuple[Callable[..., Any], Any]:
    """The factory and the config to call it with; its signature checked against the contract."""
    if isinstance(component, Component):
        assert component.kind == kind, f"{component.kind} {component.name!r} is not a {kind}"
        factory = component.load_factory()
        has_config = component.config is not None
        if has_config and config is None:
            try:
                config = component.config()
            except FieldTypeError as exc:  # a default not of its field's type
                raise AssertionError(f"{kind} {component.name!r}: its config's default {exc}") from None
            except TypeError as exc:  # a required field: the kit cannot make the config up
                raise AssertionError(f"{kind} {component.name!r}: its config has no default ({exc}); pass one: "
                                     f"check_{kind}(component, {component.config.__name__}(...))") from None
        if has_config:
            assert isinstance(config, component.config), f"config {config!r} is not a {component.config.__name__}"
    else:
        factory, has_config = component, config is not None
    problems = protocols.factory_problems(kind, factory, has_config)
    assert not problems, f"{kind} factory {_qualname(factory)}: " + "; ".join(problems)
    return factory, config


def _build(kind: str, component, config, **kwargs) -> Any:
    factory, config = _factory(kind, component, config)
    with frozen_build_rng() if kind in protocols.FROZEN_KINDS else contextlib.nullcontext():  # as Component.build
        return factory(config, **kwargs) if config is not None else factory(**kwargs)


def _members(kind: str, obj: Any) -> Any:
    """Every member of the kind's protocol is there (optional ones too: the engine calls them)."""
    lacks = protocols.lacking(kind, obj)
    assert lacks is None, f"{kind} {type(obj).__name__} {lacks}"
    assert isinstance(obj, protocols.PROTOCOLS[kind])
    problem = protocols.bases_problem(kind, obj)
    assert problem is None, f"{kind} {problem}"
    problem = protocols.keywords_problem(kind, obj)
    assert problem is None, f"{kind} {problem}"
    return obj


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def _torch():
    import torch

    return torch


def _ok(problem: str | None, what: str) -> None:
    """``problem`` (from :mod:`minfm_core.boundary`, the checks the engine makes on every batch)
    as an AssertionError naming ``what``."""
    assert problem is None, f"{what}: {problem}"


def reference_attention(q, k, v, cu_seqlens, max_seqlen):
    """Plain attention within each packed sequence (the attention backend contract), for the
    denoiser check: an isolated registry may hold no attention backend."""
    torch = _torch()
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    mask = seg[:, None] == seg[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    )
    return out.transpose(0, 1)


def check_denoiser(component, config=None, *, smoke: bool = True, attention: Any = None) -> Any:
    """Built on the meta device (``load_weights=False``), as ``minfm check`` does; then, if the
    config names no pretrained weights and has the declared ``d_img`` / ``d_txt`` attributes, a
    randomly initialised CPU copy runs one packed forward of two samples. ``attention``: the
    backend passed to the factory (default: :func:`reference_attention`)."""
    torch = _torch()
    attention = attention or reference_attention
    try:
        with torch.device("meta"):
            model = _build("denoiser", component, config, load_weights=False, attention=attention, balancer=None)
    except (AssertionError, MinfmError, ImportError):  # the kit's finding, or a clean refusal to build here
        raise
    except Exception as exc:  # the contract: structure only, on the meta device (what `minfm check` builds)
        raise AssertionError(f"the factory raised {type(exc).__name__}: {exc} when built on the meta device with "
                             "load_weights=False; it must build the structure there (docs/plugins.md)") from exc
    _members("denoiser", model)
    assert isinstance(model, torch.nn.Module), "a denoiser is a torch.nn.Module"
    cfg = _factory("denoiser", component, config)[1]
    meta_sd = model.pretrained_state_dict()
    assert meta_sd is None or isinstance(meta_sd, dict)
    if not smoke or meta_sd is not None or sum(p.numel() for p in model.parameters()) > 20_000_000:
        return model
    d_img, d_txt, d_vec = (getattr(cfg, a, None) for a in ("d_img", "d_txt", "d_vec"))
    if not (d_img and d_txt):
        return model
    model = _build("denoiser", component, config, load_weights=True, attention=attention, balancer=None)
    gen = torch.Generator().manual_seed(0)
    img_lens, txt_lens = torch.tensor([4, 6]), torch.tensor([3, 2])
    img = torch.randn(10, d_img, generator=gen)
    grids = [torch.meshgrid(torch.arange(1), torch.arange(2), torch.arange(n // 2), indexing="ij") for n in (4, 6)]
    pos = torch.cat([torch.stack(g, -1).reshape(-1, 3) for g in grids])  # (t, y, x) of 1x2x2 and 1x2x3 grids
    v = model(img, pos, img_lens, torch.randn(5, d_txt, generator=gen), txt_lens, torch.tensor([0.3, 0.7]),
              vec=torch.randn(2, d_vec, generator=gen) if d_vec else None, guidance=None)
    _ok(boundary.velocity_problem(v, img), "denoiser output")
    return model


def check_vae(component, config=None, *, smoke: bool = False) -> Any:
    """Structure only by default (``load_weights=False`` on meta): real VAEs load weights.
    The config must have ``latent_channels`` and ``compression`` (:class:`protocols.VaeConfig`)."""
    torch = _torch()
    cfg = _factory("vae", component, config)[1]
    assert isinstance(cfg, protocols.VaeConfig), "a VAE config has latent_channels and compression"
    if not smoke:
        with torch.device("meta"):
            return _members("vae", _build("vae", component, config, load_weights=False))
    vae = _members("vae", _build("vae", component, config, load_weights=True))
    images = [torch.rand(3, 1, 16, 16) * 2 - 1, torch.rand(3, 1, 16, 24) * 2 - 1]

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(len(images))]

    latents = vae.encode(images, generators=gens())
    _ok(boundary.latents_problem(latents, images, cfg), "vae: latents = encode(images) (latent_channels, compression)")
    torch.rand(7)
    assert all(torch.equal(a, b) for a, b in zip(latents, vae.encode(images, generators=gens()))), (
        "vae: encode with equally seeded generators differs: draw every random number from generators[i]")
    back = vae.decode(latents)
    _ok(boundary.decoded_problem(back, [tuple(x.shape[1:]) for x in images]), "vae: images = decode(latents)")
    again = _rebuilt("vae", component, config)
    same = all(torch.equal(a, b) for a, b in zip(back, again.decode(latents)))
    _ok(None if same else _FROZEN_RULE, "vae")
    return vae


def check_text_encoder(component, config=None, *, smoke: bool = False) -> Any:
    torch = _torch()
    if not smoke:
        with torch.device("meta"):
            return _members("text_encoder", _build("text_encoder", component, config, load_weights=False))
    cfg = _factory("text_encoder", component, config)[1]
    enc = _members("text_encoder", _build("text_encoder", component, config, load_weights=True))
    prompts = ["a red circle", "a blue square on a white background"]
    out = enc(prompts)
    _ok(boundary.text_problem(out, 2, getattr(cfg, "dim", None), enc.pooled), "text_encoder: enc(prompts) (its config's dim)")
    counts = enc.count_tokens(prompts)
    _ok(boundary.counts_problem(counts, 2), "text_encoder: count_tokens(prompts)")
    want = [1, 1] if enc.pooled else out[1].tolist()
    assert counts is None or counts == want, \
        f"text_encoder: count_tokens(prompts) gives {counts}, but __call__ gives {want} tokens (lens; 1 each when pooled)"
    again = _rebuilt("text_encoder", component, config)(["a red circle", "a blue square on a white background"])
    same = torch.equal(out, again) if enc.pooled else all(torch.equal(a, b) for a, b in zip(out, again))
    _ok(None if same else _FROZEN_RULE, "text_encoder")
    return enc


_FROZEN_RULE = ("two builds of one config differ: a frozen component is built anew by every process and "
                "every job (a checkpoint does not hold its weights), so its weights must be a pure function "
                "of its config (docs/plugins.md, register_text_encoders)")


def _rebuilt(kind: str, component, config) -> Any:
    """A second build of a frozen component, after other random numbers were drawn (as a
    trainer does before it builds the encoders, and a sampler does not)."""
    torch = _torch()
    torch.rand(7)
    return _build(kind, component, config, load_weights=True)


def check_patchifier(component, config=None) -> Any:
    torch = _torch()
    p = _members("patchifier", _build("patchifier", component, config))
    latents = [torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 16)]
    out = p.patchify(latents)
    _ok(boundary.patched_problem(out, 2), "patched = patchify(latents)")
    back = p.unpatchify(out.tokens, out.lens, out.shapes)
    _ok(boundary.unpatched_problem(back, [x.shape for x in latents]), "latents = unpatchify(tokens, lens, shapes)")
    assert all(torch.equal(a, b) for a, b in zip(back, latents)), "unpatchify inverts patchify"
    return p


def check_path(component, config=None) -> Any:
    torch = _torch()
    path = _members("path", _build("path", component, config))
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    _ok(boundary.shaped_like_problem(path.noise(x0, eps, torch.full((5, 1), 0.5)), x0), "x_t = path.noise(x0, eps, t)")
    _ok(boundary.shaped_like_problem(path.target(x0, eps), x0), "v = path.target(x0, eps)")
    return path


def check_time_sampler(component, config=None) -> Any:
    torch = _torch()
    sampler = _members("time_sampler", _build("time_sampler", component, config))
    t = sampler(64, generator=torch.Generator().manual_seed(0), device="cpu")
    _ok(boundary.times_problem(t, 64), "time_sampler(64)")
    one = [sampler(1, generator=torch.Generator().manual_seed(s)) for s in (1, 1)]
    _ok(boundary.times_problem(one[0], 1), "time_sampler(1) (the trainer calls it per sample)")
    assert torch.equal(one[0], one[1]), "the same generator state gives the same t"
    return sampler


def check_time_warper(component, config=None) -> Any:
    torch = _torch()
    warper = _members("time_warper", _build("time_warper", component, config))
    t = warper(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([16, 256, 4096]))
    _ok(boundary.times_problem(t, 3), "time_warper")
    return warper


def check_time_weighter(component, config=None) -> Any:
    torch = _torch()
    weighter = _members("time_weighter", _build("time_weighter", component, config))
    _ok(boundary.weights_problem(weighter(torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])), 5), "time_weighter")
    return weighter


def check_sampler(component, config=None) -> Any:
    torch = _torch()
    sampler = _members("sampler", _build("sampler", component, config))
    noise, lens = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([2, 4])
    steps: list[int] = []
    x0 = sampler(lambda x, t: torch.zeros_like(x), noise.clone(), lens, steps=3, warper=None,
                 generators=[torch.Generator().manual_seed(s) for s in (0, 1)], callback=lambda k, n: steps.append(k))
    _ok(boundary.shaped_like_problem(x0, noise), "x0 = sampler(velocity, x, lens, ...)")
    assert steps == [1, 2, 3], (f"integrates in `steps` steps, calling callback(k, steps) after step k = 1, "
                                f"2, ..., steps (the demo's progress bar reads it): got k = {steps} for steps=3")

    def solve(order):  # the two samples in this order, each with its own seed
        x = torch.cat([noise.split([2, 4])[i] for i in order])
        return sampler(lambda x, t: -x, x, lens[list(order)], steps=3, warper=None,
                       generators=[torch.Generator().manual_seed(s) for s in order]).split([int(lens[i]) for i in order])

    a, b = solve((0, 1)), solve((1, 0))
    assert torch.equal(a[0], solve((0, 1))[0]), "the same generators give the same samples (use `generators`)"
    assert torch.allclose(a[0], b[1], atol=1e-6) and torch.allclose(a[1], b[0], atol=1e-6), \
        "a sample depends on its own generator, not on its place in the pack"
    return sampler


def check_guidance(component, config=None) -> Any:
    torch = _torch()
    g = _members("guidance", _build("guidance", component, config))
    assert isinstance(g.needs_uncond, bool)
    v = torch.randn(6, 4)
    _ok(boundary.shaped_like_problem(g(v, v.clone(), torch.tensor([2, 4])), v), "v = guidance(v_cond, v_uncond, lens)")
    return g


def check_attention(component, config=None, *, smoke: bool = True) -> Any:
    torch = _torch()
    attn = _members("attention", _build("attention", component, config))
    if smoke:
        q = torch.randn(5, 2, 8)
        out = attn(q, q, q, torch.tensor([0, 2, 5], dtype=torch.int32), 3)
        _ok(boundary.attention_problem(out, q), "attention: out = attention(q, k, v, cu_seqlens, max_seqlen)")
    return attn


def check_balancer(component, config=None) -> Any:
    """Needs a process group (``torch.distributed``) for balancers that are not ``identity``."""
    torch = _torch()
    bal = _members("balancer", _build("balancer", component, config))
    assert isinstance(bal.identity, bool)
    if bal.identity or torch.distributed.is_initialized():
        tokens, lens = torch.randn(7, 4), torch.tensor([3, 4])
        routed, routed_lens, extras, handle = bal.route(tokens, lens, [torch.arange(7)])
        assert int(routed_lens.sum()) == routed.shape[0] == extras[0].shape[0]
        assert torch.equal(bal.reverse(routed, handle), tokens), "reverse undoes route"
        if not bal.identity:  # what a denoiser reads from the handle (protocols.BalancerHandle)
            from .protocols import BalancerHandle

            assert isinstance(handle, BalancerHandle), "route's handle has `samples` and `offsets`"
            assert len(handle.samples) == len(handle.offsets) == len(routed_lens), \
                "handle.samples / handle.offsets: one entry per routed chunk"
    return bal


def check_parallelizer(component, config=None) -> Any:
    return _members("parallelizer", _build("parallelizer", component, config))


def check_dataset(component, config=None, *, split: str = "train") -> Any:
    ds = _members("dataset", _build("dataset", component, config, split=split))
    assert len(ds) > 0, "an empty dataset"
    item = ds[0]
    _ok(boundary.item_problem(item), "item 0")
    assert ds.prompt(0) == item["prompt"], "prompt(i) is item i's prompt"
    ds.set_epoch(1)
    return ds


def check_logger(component, config=None, *, run_dir: str) -> Any:
    from PIL import Image

    lg = _members("logger", _build("logger", component, config, run_dir=str(run_dir), rank=0, recipe={}))
    lg.set_total(2)
    lg.log(1, {"loss": 0.5, "lr": 1e-4})
    lg.log_images(1, "samples/raw", [Image.new("RGB", (8, 8))], ["a caption"])
    lg.close()
    return lg


def check_source(component, config=None) -> Callable[..., Any]:
    """Signature only (every keyword the engine may pass, see ``FACTORY_KWARGS``): resolving
    needs a real URI (call the resolver in your own test)."""
    resolver, _ = _factory("source", component, None)
    return resolver


def check_metric(component, config=None) -> Callable[..., Any]:
    """Signature only: a metric needs reference images (build it in your own test)."""
    factory, _ = _factory("metric", component, None)
    return factory


_CHECKS: dict[str, Callable[..., Any]] = {kind: globals()[f"check_{kind}"] for kind in protocols.PROTOCOLS}
