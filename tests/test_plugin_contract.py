"""Every registered component passes the conformance kit (minfm_core.testing).

Cases come from the registry (all kinds, all names), configs from the component's defaults
or, when its defaults are not a complete config (FLUX needs a flavor), from the first
shipped or test recipe that uses it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from minfm_core import protocols, testing
from minfm_core.errors import MinfmError, PluginError
from minfm_core.registry import KINDS, get_registry

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [ROOT / "tests" / "recipes" / "tiny.toml", *sorted((ROOT / "recipes").glob("*.toml"))]


@functools.cache
def recipe_configs() -> dict[tuple[str, str], object]:
    from minfm_core.recipe import load_recipe

    found: dict[tuple[str, str], object] = {}
    for path in RECIPES:
        for slot in load_recipe(path).slots.values():
            found.setdefault((slot.component.kind, slot.component.name), slot.config)
    return found


def config_for(comp):
    if comp.config is None:
        return None
    try:
        return comp.config()
    except (TypeError, ValueError):
        key = (comp.kind, comp.name)
        assert key in recipe_configs(), f"{comp.kind} {comp.name!r}: no default config and no recipe uses it"
        return recipe_configs()[key]


CASES = [(kind, name) for kind in KINDS for name in get_registry().names(kind)]


def test_every_kind_has_a_protocol_factory_keywords_and_a_check():
    assert set(protocols.PROTOCOLS) == set(KINDS) == set(protocols.FACTORY_KWARGS)
    assert {f"check_{kind}" for kind in KINDS} <= set(testing.__all__)


def test_the_registry_builds_with_the_protocols_keyword_table():
    # One table: what Component.build accepts and `minfm check` binds is what the docs declare.
    from minfm_core import registry

    assert registry.FACTORY_KWARGS is protocols.FACTORY_KWARGS


@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_builtin_component_conforms(kind, name, tmp_path, request):
    comp = get_registry().get(kind, name)
    cfg = config_for(comp)
    extra = {"run_dir": tmp_path} if kind == "logger" else {}
    if kind == "balancer":
        request.getfixturevalue("runtime")  # a world of one: knapformer makes process groups
    try:
        testing.check_component(kind, comp, cfg, **extra)
    except (MinfmError, ImportError) as exc:
        # A clean refusal to build here (missing data folder, optional package, GPU-only
        # kernel): the factory's signature was checked before building; say why it stopped.
        pytest.skip(f"{kind} {name!r} does not build on this machine: {exc}")


def test_a_factory_without_balancer_keyword_is_caught():
    def build(cfg, *, load_weights=True, attention=None):  # the pre-contract third-party denoiser
        raise AssertionError("never built")

    problems = protocols.factory_problems("denoiser", build, has_config=True)
    assert problems == ["does not accept the keyword balancer= the engine may pass"]
    with pytest.raises(AssertionError, match="balancer="):
        testing.check_denoiser(build, object())


def test_a_logger_without_set_total_is_caught(tmp_path):
    class Bare:  # log, log_images and close, but neither set_total nor the protocol's base
        def __init__(self, cfg, *, run_dir, rank=0, recipe=None):
            pass

        def log(self, step, metrics):
            pass

        def log_images(self, step, name, images, captions):
            pass

        def close(self):
            pass

    with pytest.raises(AssertionError, match="lacks set_total"):
        testing.check_logger(Bare, object(), run_dir=tmp_path)

    class Based(Bare, protocols.Logger):  # the protocol's default set_total
        pass

    assert testing.check_logger(Based, object(), run_dir=tmp_path)


def test_isolated_registry_holds_only_the_plugins_under_test():
    from minfm_core import hookimpl

    class Only:
        @hookimpl
        def register_time_samplers(self, register):
            register("uniform", "minfm_plugins.flow.time:UniformTimeSampler",
                     get_registry().get("time_sampler", "uniform").config)

    before = get_registry()
    with testing.isolated_registry(Only()) as reg:
        # the installed 'flow' plugin also registers 'uniform': no "registered by both" here
        assert get_registry() is reg and reg.names("time_sampler") == ["uniform"]
        assert reg.names("denoiser") == []
        testing.check_time_sampler(reg.get("time_sampler", "uniform"))
    assert get_registry() is before


def _dataset_of(item):
    class DS(protocols.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return item

    def build(cfg, *, split="train"):
        return DS()

    return build


@pytest.mark.parametrize("item, message", [
    ({"image": "x"}, "item 0: expected a 'prompt' string, got no 'prompt'"),
    ({"image": "x", "prompt": 3}, "item 0: 'prompt': expected a string, got int"),
    ({"image": "pixels", "prompt": "p"}, "item 0: 'image': expected a torch tensor (3, F, H, W), got str"),
    ({"image": (3, 8, 8), "prompt": "p"},
     "item 0: 'image': expected shape (3, F, H, W) (RGB, frames, height, width), got (3, 8, 8)"),
    ({"image": (3, 1, 8, 8, 5.0), "prompt": "p"}, "item 0: 'image': expected values in [-1, 1], got [5, 5]"),
], ids=["no-prompt", "int-prompt", "not-a-tensor", "three-dims", "out-of-range"])
def test_the_dataset_check_says_what_is_wrong(item, message):
    import torch

    if isinstance(item["image"], tuple):
        shape, fill = (item["image"][:4], item["image"][4]) if len(item["image"]) == 5 else (item["image"], 0.0)
        item = {**item, "image": torch.full(shape, fill)}
    with pytest.raises(AssertionError) as info:
        testing.check_dataset(_dataset_of(item), object())
    assert str(info.value).splitlines()[0] == message


def test_the_time_sampler_check_says_a_list_is_not_a_tensor():
    class ListSampler(protocols.TimeSampler):
        def __call__(self, n, *, generator=None, device="cpu"):
            return [0.5] * n

    with pytest.raises(AssertionError) as info:
        testing.check_time_sampler(lambda cfg: ListSampler(), object())
    assert str(info.value).splitlines()[0] == "time_sampler(64): expected a tensor of shape (64,), got list"


def test_the_denoiser_check_says_a_tuple_is_not_a_tensor():
    """It raised AttributeError ('tuple' object has no attribute 'shape'), not the kit's
    AssertionError."""
    import torch

    class Tupled(torch.nn.Module, protocols.Denoiser):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, img, img_pos, img_lens, txt, txt_lens, t, vec=None, guidance=None):
            return (self.lin(img),)

        def init_weights(self):
            pass

    class Cfg:
        d_img, d_txt, d_vec = 4, 4, None

    with pytest.raises(AssertionError) as info:
        testing.check_denoiser(lambda cfg, **kw: Tupled(), Cfg())
    assert str(info.value) == "denoiser output: expected a tensor of shape (10, 4) (the input's), got tuple"


def test_the_balancer_check_asks_for_the_handle_a_denoiser_reads(tmp_path):
    """A balancer written from the protocol alone (a handle of its own) crashed flux's first
    step on handle.samples; the check passed it. In a one-rank gloo group, as the check needs."""
    import torch.distributed as dist

    from minfm_core.registry import get_registry

    class Shuffle(protocols.Balancer):  # routes nothing anywhere, but says it is not identity
        identity = False

        def route(self, tokens, datum_lens, extras=()):
            return tokens, datum_lens, list(extras), ("mine",)

        def reverse(self, tokens, handle):
            return tokens

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(AssertionError, match="route's handle has `samples` and `offsets`"):
            testing.check_balancer(lambda cfg: Shuffle(), object())
        knapformer = get_registry().get("balancer", "knapformer")
        assert testing.check_balancer(knapformer) is not None  # the built-in one keeps the contract
    finally:
        dist.destroy_process_group()


def test_a_module_listing_the_protocol_first_is_told_to_swap_its_bases():
    """class Net(protocols.Denoiser, nn.Module): the protocol's __call__ stub won, and
    model(...) returned None, which the check did not notice without a d_img to call with."""
    import torch

    class Net(protocols.Denoiser, torch.nn.Module):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, *args, **kwargs):
            return self.lin.weight.sum()

        def init_weights(self):
            pass

    with pytest.raises(AssertionError, match="list torch.nn.Module before minfm_core.protocols.Denoiser"):
        testing.check_denoiser(lambda cfg, **kw: Net(), object(), smoke=False)
    # and where the engine builds it (minfm check, the run): the run's error was "got NoneType"
    from minfm_core.components import component

    comp = component("denoiser", "swapped", lambda cfg=None, **kw: Net(), None, "probe", None)
    with pytest.raises(PluginError, match=r"^denoiser 'swapped' of plugin 'probe': built Net: list torch.nn.Module "
                                          r"before minfm_core.protocols.Denoiser in its bases"):
        comp.build()


def test_a_missing_required_member_is_not_blamed_on_inheritance():
    class Half:  # a path without target
        def noise(self, x0, eps, t):
            return x0

    with pytest.raises(AssertionError, match=r"lacks target \(required: define target"):
        testing.check_component("path", lambda cfg: Half(), object())


def test_the_sampler_check_catches_noise_from_the_global_generator():
    import torch

    class GlobalNoise(protocols.Sampler):
        def __call__(self, velocity, noise, seq_lens, *, steps, warper=None, generators=None, callback=None):
            x = noise
            for k in range(steps):
                x = x + 0.1 * torch.randn_like(x)  # torch's global generator: not reproducible
                if callback:
                    callback(k + 1, steps)
            return x

    with pytest.raises(AssertionError, match="the same generators give the same samples"):
        testing.check_sampler(lambda cfg: GlobalNoise(), object())


def test_the_sampler_and_guidance_checks_say_a_list_is_not_a_tensor():
    """They raised AttributeError ('list' object has no attribute 'shape'), not the kit's AssertionError."""

    class ListSampler(protocols.Sampler):
        def __call__(self, velocity, noise, seq_lens, *, steps, warper=None, generators=None, callback=None):
            return [noise]

    class ListGuidance(protocols.Guidance):
        needs_uncond = True

        def __call__(self, v_cond, v_uncond, lens):
            return [v_cond]

    for check, built, what in ((testing.check_sampler, ListSampler(), "x0 = sampler(velocity, x, lens, ...)"),
                               (testing.check_guidance, ListGuidance(), "v = guidance(v_cond, v_uncond, lens)")):
        with pytest.raises(AssertionError) as info:
            check(lambda cfg, built=built: built, object())
        assert str(info.value).splitlines()[0] == f"{what}: expected a tensor of shape (6, 4) (the input's), got list"


def test_the_kit_says_what_it_cannot_build_as_an_assertion():
    """A config with a required field, and a denoiser that fails on the meta device, raised
    attrs' TypeError and the factory's RuntimeError: not the kit's AssertionError."""
    import torch

    from minfm_core import config, field
    from minfm_core.components import component

    @config
    class Required:
        """A weighter with a required slope."""

        slope: float = field(doc="no default")

    weighter = component("time_weighter", "sloped", lambda cfg: None, Required, "probe", None)
    with pytest.raises(AssertionError, match=r"^time_weighter 'sloped': its config has no default \(.*slope.*\); "
                                             r"pass one: check_time_weighter\(component, Required\(\.\.\.\)\)$"):
        testing.check_time_weighter(weighter)

    def meta_only_fails(cfg, *, load_weights=True, attention=None, balancer=None):
        return torch.nn.Linear(2, 2).weight.sum().item()

    with pytest.raises(AssertionError, match=r"^the factory raised RuntimeError: .* when built on the meta device "
                                             r"with load_weights=False; it must build the structure there"):
        testing.check_denoiser(meta_only_fails, object())


class _DefaultInitEncoder:
    """A text encoder left at torch's default initialisation (no seed, no pretrained weights):
    what a plugin written from the protocol alone easily does."""

    @staticmethod
    def build(cfg=None, *, load_weights=True):
        import torch

        class Enc(torch.nn.Module, protocols.TextEncoder):
            pooled = True

            def __init__(self):
                super().__init__()
                self.table = torch.nn.Embedding(256, 8)

            def forward(self, prompts):
                return torch.stack([self.table(torch.tensor(list(p.encode()[:16]) or [0])).mean(0) for p in prompts])

        return Enc()


def test_a_frozen_component_left_at_default_init_builds_alike_whatever_was_drawn_before():
    """Text encoders and VAEs are not in checkpoints: the trainer built an unseeded encoder
    after drawing the denoiser's init, `minfm sample` without, so samples came from other text
    embeddings than training used (and ranks of a sharded run, of which only rank 0 draws the
    full init, disagreed). Their factories now run with the global generator seeded, and the
    caller's random stream goes on as if nothing had been built."""
    import torch

    from minfm_core.components import component

    comp = component("text_encoder", "plain", _DefaultInitEncoder.build, None, "probe", None)
    torch.manual_seed(1)
    first = comp.build().table.weight
    after_first = torch.rand(3)
    torch.manual_seed(1)
    torch.rand(100)  # a trainer's denoiser init
    second = comp.build().table.weight
    assert torch.equal(first, second)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_first)  # the build drew nothing from the caller's stream
    # the denoiser's init is the caller's to seed: it follows run.seed
    assert protocols.FROZEN_KINDS == {"vae", "text_encoder"}


def test_the_kit_passes_a_default_init_encoder_and_refuses_one_built_from_other_randomness():
    import numpy as np
    import torch

    testing.check_text_encoder(_DefaultInitEncoder.build, smoke=True)  # seeded as the engine builds it

    def numpy_random(cfg=None, *, load_weights=True):  # weights from numpy's unseeded generator
        enc = _DefaultInitEncoder.build()
        with torch.no_grad():
            enc.table.weight.copy_(torch.from_numpy(np.random.default_rng().standard_normal((256, 8))))
        return enc

    with pytest.raises(AssertionError) as info:
        testing.check_text_encoder(numpy_random, smoke=True)
    assert str(info.value).startswith("text_encoder: two builds of one config differ: "
                                      "a frozen component is built anew by every process")


def test_the_kit_refuses_a_vae_whose_noise_ignores_the_generators():
    """Posterior noise from torch's global generator: a resumed run encoded its images with other
    noise than the run it continues (flux_ae did so before encode took one generator per image)."""
    import torch

    class GlobalNoise(torch.nn.Module, protocols.Vae):
        def encode(self, images, generators=None):
            return [x + torch.randn(x.shape) for x in images]

        def decode(self, latents):
            return [z.clamp(-1, 1) for z in latents]

    class Cfg:
        latent_channels, compression = 3, (1, 1, 1)

    with pytest.raises(AssertionError, match="draw every random number from generators"):
        testing.check_vae(lambda cfg, *, load_weights=True: GlobalNoise(), Cfg(), smoke=True)


def test_a_method_without_a_keyword_its_protocol_declares_is_refused_when_built():
    """A VAE written against the older protocol, `encode(self, images)`, met the engine's
    `generators=` as a TypeError at the first batch; now its build says so, by name."""
    from minfm_core.components import component

    class OldVae(protocols.Vae):
        def encode(self, images):
            return list(images)

        def decode(self, latents):
            return list(latents)

    comp = component("vae", "old", lambda cfg=None, **kw: OldVae(), None, "probe", None)
    with pytest.raises(PluginError) as info:
        comp.build()
    assert str(info.value) == ("vae 'old' of plugin 'probe': built OldVae does not take the keyword encode(generators=) "
                               "that minfm_core.protocols.Vae declares and the engine passes")

    class OldSampler(protocols.TimeSampler):  # two missing, and a module's forward is what is read
        def __call__(self, n):
            return None

    with pytest.raises(AssertionError, match=r"does not take the keywords __call__\(generator=\), __call__\(device=\)"):
        testing.check_component("time_sampler", lambda cfg: OldSampler(), object())
