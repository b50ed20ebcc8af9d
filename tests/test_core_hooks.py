"""Every hook works through a real plugin object, and every hook is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pluggy
import pytest

from minfm_core import config, field, hookimpl, hookspecs, protocols
from minfm_core.cli.main import main
from minfm_core.errors import RecipeError
from minfm_core.plugins import plugin
from minfm_core.recipe import resolve_recipe
from minfm_core.registry import KINDS, get_registry

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def all_hooks() -> list[str]:
    marker = "minfm_spec"
    return sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker))


@config
class ProbeConfig:
    """A probe component for hook tests."""

    value: int = field(1, doc="a number")


@config
class ProbeVaeConfig:
    """A probe component for hook tests."""

    value: int = field(1, doc="a number")
    latent_channels: int = field(4, doc="what protocols.VaeConfig asks of a VAE's config")
    compression: tuple[int, int, int] = field((1, 8, 8), doc="what protocols.VaeConfig asks of a VAE's config")


#: Kinds whose config the engine reads (protocols.CONFIG_PROTOCOLS) register the probe with one that has it.
PROBE_CONFIGS = {"vae": ProbeVaeConfig}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_register_hook_of_each_kind(kind):
    hook_name = KINDS[kind]

    class Probe:
        pass

    # what the factory builds has every member of the kind's protocol (build checks that)
    members = {m: (lambda *a, **k: None) for m in protocols.members(kind)}
    Built = type("Built", (), {**members, "__init__": lambda self, value: setattr(self, "value", value)})

    configless = kind in protocols.CONFIGLESS_KINDS  # a source or metric: its factory is called as it is
    cfg_cls = PROBE_CONFIGS.get(kind, ProbeConfig)
    assert set(protocols.CONFIG_PROTOCOLS) <= set(PROBE_CONFIGS)

    def impl(register):
        if configless:
            register(f"probe_{kind}", lambda *a, **k: Built(3), doc=ProbeConfig.__doc__)
        else:
            register(f"probe_{kind}", lambda cfg: Built(cfg.value), cfg_cls)

    impl.__name__ = hook_name
    setattr(Probe, hook_name, staticmethod(hookimpl(impl)))
    with plugin(Probe(), "probe"):
        comp = get_registry().get(kind, f"probe_{kind}")
        assert comp.plugin == "probe"
        assert comp.doc == "A probe component for hook tests."
        built = comp.load_factory()("ref") if configless else comp.build(cfg_cls(value=3))
        assert built.value == 3
    assert f"probe_{kind}" not in get_registry().names(kind)


class _Commands:
    @hookimpl
    def register_commands(self, subparsers):
        p = subparsers.add_parser("probe-cmd", help="a command added by a plugin")
        p.add_argument("--n", type=int, default=1)
        p.set_defaults(func=lambda args: 40 + args.n)


def test_register_commands_hook():
    with plugin(_Commands(), "commands"):
        assert main(["probe-cmd", "--n", "2"]) == 42


class _Check:
    @hookimpl
    def check_recipe(self, recipe, world_size):
        if recipe.recipe.train.max_steps > 100 and world_size == 3:
            return ["train.max_steps: too many for three ranks (probe)"]
        return []


def test_check_recipe_hook(toy_registry):
    raw = {"model": {"denoiser": "flux"}, "train": {"max_steps": 1000}, "parallel": {"name": "fsdp2"}}
    with plugin(_Check(), "check"):
        resolve_recipe(raw, registry=toy_registry, world_size=2)
        with pytest.raises(RecipeError) as info:
            resolve_recipe(raw, registry=toy_registry, world_size=3)
    assert info.value.problems == ["train.max_steps: too many for three ranks (probe)"]


class _NoDistance:  # a metric written without the protocol, lacking one member
    def __init__(self, ref, **kw):
        self.made = (ref, kw)

    def features(self, images):
        return images

    def reference_features(self, *, batch_size, shard=(0, 1)):
        return None

    def stats(self, features):
        return features


class _ProbeMetric(_NoDistance):
    def distance(self, a, b):
        return 0.0


class _Metric:
    @hookimpl
    def register_metrics(self, register):
        register("probe_metric", _ProbeMetric)
        register("no_distance", _NoDistance)


def test_register_metrics_hook():
    """What the factory builds is checked as Component.build checks any kind: a metric lacking
    `distance` trained up to its first FID, then died of an AttributeError blamed on minFM."""
    from minfm_core.errors import PluginError
    from minfm_core.metrics import build_metric

    with plugin(_Metric(), "metric"):
        assert build_metric("probe_metric", "ref.npz", device="cpu").made == ("ref.npz", {"device": "cpu"})
        with pytest.raises(PluginError, match=r"^metric 'no_distance' of plugin 'metric': built _NoDistance lacks "
                                              r"distance \(required: define distance\)"):
            build_metric("no_distance", "ref.npz")


def test_every_hook_is_tested_and_documented():
    hooks = all_hooks()
    extra = {"register_commands", "check_recipe", "register_metrics"}  # hooks that fill no component registry
    assert set(hooks) == set(KINDS.values()) | extra
    tested = set(KINDS.values()) | extra  # the tests above
    assert set(hooks) <= tested
    text = DOCS.read_text()
    sections = set(re.findall(r"^### `(\w+)", text, flags=re.M))
    missing = [h for h in hooks if h not in sections]
    assert not missing, f"docs/plugins.md lacks a '### `hook`' section for {missing}"


def test_hookspec_bodies_are_docstrings_only():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(hookspecs))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert len(node.body) == 1 and isinstance(node.body[0], ast.Expr), node.name
            assert isinstance(node.body[0].value, ast.Constant), node.name


def test_project_name_is_minfm():
    assert isinstance(hookspecs.hookspec, pluggy.HookspecMarker)
    assert hookspecs.hookspec.project_name == "minfm" and hookspecs.hookimpl.project_name == "minfm"


class _Wrapping:
    """A parallelizer wrapping the model as DDP does: its names gain `module.`."""

    def parallelize(self, module, *, world_size, device, trainable):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.module = inner

        return Wrapper(module)


class _WrapPlugin:
    @hookimpl
    def register_parallelizers(self, register):
        register("wrapping", lambda cfg=None: _Wrapping(), None)


def test_a_parallelizer_that_renames_the_state_dict_is_refused(tmp_path):
    """Training ran with a wrapper's names, then `minfm sample` failed on every EMA key
    (`unexpected keys: module.double_blocks.0...`): checkpoints, the EMA and rank 0's
    broadcast are keyed by the module's own names."""
    import torch

    from engine_helpers import tiny
    from minfm_core.engine.pipeline import shard
    from minfm_core.errors import PluginError

    with plugin(_WrapPlugin(), "wrap"):
        resolved = tiny(tmp_path, "parallel={name = 'wrapping'}")
        with pytest.raises(PluginError, match=r"^parallel: parallelizer 'wrapping' of plugin 'wrap': parallelize changed the "
                                              r"state-dict names \('module\.[^']+', \.\.\.\); it must return the module"):
            shard(resolved, torch.nn.Linear(2, 2), world_size=1, device=torch.device("cpu"), trainable=True)
