"""Plugin loading: entry points, third-party distributions, failures, blocking, typos."""

from __future__ import annotations

import json
import typing

import pytest

from minfm_core import hookimpl
from minfm_core.errors import PluginError, RecipeError, UnknownComponentError
from minfm_core.plugins import load_plugins, plugin
from minfm_core.registry import Registry, get_registry


def test_third_party_plugin_is_listed_with_fields(minfm, example_plugin_env):
    res = minfm("plugins", "--json", env=example_plugin_env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert {"name": "example", "origin": "minfm_example_plugin", "commands": []} in info["plugins"]
    (beta,) = [c for c in info["kinds"]["time_sampler"] if c["name"] == "beta"]
    assert beta["plugin"] == "example"
    assert beta["doc"] == "Beta(a, b) time sampling."
    assert beta["fields"][0] == {"name": "a", "type": "float", "default": 2.0, "required": False, "doc": "first shape parameter",
                                "range": "> 0"}  # from its attrs gt(0) validator


def test_broken_plugin_is_reported_and_skipped(minfm, example_plugin_env):
    res = minfm("plugins", "--json", env=example_plugin_env)
    assert res.returncode == 0
    info = json.loads(res.stdout)
    assert info["failed"] == [{"name": "broken", "error": "RuntimeError: this plugin is broken on purpose"}]
    assert "plugin 'broken' (minfm_broken_plugin) failed to import and was skipped" in res.stderr
    assert "Traceback" not in res.stderr
    # The others still load.
    assert any(p["name"] == "example" for p in info["plugins"])


def test_disable_plugins_env(minfm, example_plugin_env):
    env = {**example_plugin_env, "MINFM_DISABLE_PLUGINS": "example, broken"}
    info = json.loads(minfm("plugins", "--json", env=env).stdout)
    names = {p["name"] for p in info["plugins"]}
    assert "example" not in names and info["failed"] == []
    assert all(c["name"] != "beta" for c in info["kinds"]["time_sampler"])
    assert info["blocked"] == ["broken", "example"]  # listed, not silently gone
    assert "  example            blocked (MINFM_DISABLE_PLUGINS)" in minfm("plugins", env=env).stdout.splitlines()
    assert json.loads(minfm("plugins", "--json", env=example_plugin_env).stdout)["blocked"] == []


@pytest.mark.parametrize("blocked", ["example", "minfm-example-plugin:example"])
def test_an_unknown_name_mentions_the_blocked_plugins(minfm, example_plugin_env, blocked):
    """A component of a plugin MINFM_DISABLE_PLUGINS blocks was a plain "unknown": what a blocked
    plugin registers is not known (it is not imported), so the blocked plugins are named."""
    from conftest import ROOT

    recipe = str(ROOT / "recipes" / "quickstart.toml")
    env = {**example_plugin_env, "MINFM_DISABLE_PLUGINS": f"broken,{blocked}"}
    res = minfm("check", recipe, "--set", "flow.time_sampler.name=beta", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown time_sampler 'beta'; installed: " in res.stderr
    assert f"(MINFM_DISABLE_PLUGINS blocks plugins broken, {blocked}; one of them may have it)" in res.stderr
    res = minfm("check", recipe, "--set", "flow.time_sampler.name=betta", env=example_plugin_env)
    assert res.returncode == 2 and "MINFM_DISABLE_PLUGINS" not in res.stderr and "did you mean 'beta'" in res.stderr


def test_an_unknown_name_mentions_the_plugins_that_failed_to_load(minfm, example_plugin_env):
    """What a plugin that failed to import would have registered is not known either: a recipe
    naming one of its components got a plain "unknown", the failure only in a warning above."""
    from conftest import ROOT

    res = minfm("check", str(ROOT / "recipes" / "quickstart.toml"), "--set", "flow.time_sampler.name=kumaraswamy",
                env=example_plugin_env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert ("unknown time_sampler 'kumaraswamy'" in res.stderr
            and "(plugin 'broken', which failed to load, may have it: minfm plugins says why)" in res.stderr)


def test_a_hook_that_raised_before_registering_a_component_is_named_by_it():
    class HalfWay:
        @hookimpl
        def register_loggers(self, register):
            register("tsv_log", lambda cfg=None, *, run_dir, rank, recipe: None, doc="tsv")
            raise RuntimeError("no disk")  # before csv_log

    with plugin(HalfWay(), "half_way"):
        with pytest.raises(UnknownComponentError, match=r"^logger 'tsv_log' belongs to plugin 'half_way', which was skipped"):
            get_registry().get("logger", "tsv_log")
        with pytest.raises(UnknownComponentError, match=r"unknown logger 'csv_log'.*\(plugin 'half_way', which failed to load, "
                                              r"may have it: minfm plugins says why\)$"):
            get_registry().get("logger", "csv_log")


def test_human_listing_mentions_fields(minfm, example_plugin_env):
    out = minfm("plugins", env=example_plugin_env).stdout
    assert "beta" in out and "a: float = 2.0  # first shape parameter" in out


def test_recipe_uses_third_party_component(toy_registry, monkeypatch):
    """The example plugin's hook fills a registry and a recipe selects and builds its sampler."""
    import sys

    from conftest import PLUGIN_DISTS
    from minfm_core.recipe import resolve_recipe

    monkeypatch.syspath_prepend(str(PLUGIN_DISTS))
    import minfm_example_plugin

    minfm_example_plugin.register_time_samplers(register=toy_registry.registrar("time_sampler", "example"))
    raw = {"model": {"denoiser": "flux"}, "flow": {"time_sampler": {"name": "beta", "a": 5.0}}}
    resolved = resolve_recipe(raw, registry=toy_registry)
    sampler = resolved.build("flow.time_sampler")
    t = sampler(1000)
    assert t.shape == (1000,) and 0 < float(t.min()) and float(t.max()) < 1
    assert abs(float(t.mean()) - 5 / 7) < 0.03  # Beta(5, 2) mean
    sys.modules.pop("minfm_example_plugin", None)


def test_duplicate_names_name_both_plugins():
    reg = Registry()
    reg.registrar("time_sampler", "first")("dup", lambda cfg: None)
    with pytest.raises(PluginError) as info:
        reg.registrar("time_sampler", "second")("dup", lambda cfg: None)
    assert str(info.value) == (
        "time_sampler 'dup' is registered by both plugin 'first' and plugin 'second'; "
        "disable one with MINFM_DISABLE_PLUGINS"
    )


def test_config_must_be_attrs():
    with pytest.raises(PluginError, match="must be an attrs class"):
        Registry().registrar("path", "p")("x", lambda cfg: None, dict)


class _Typo:
    @hookimpl
    def register_time_sampler(self, register):  # missing "s": not a hook
        register("never", lambda cfg: None)


def test_hook_typo_is_caught_and_plugin_skipped():
    with plugin(_Typo(), "typo") as state:
        assert state.failures["typo"] == "unknown hook 'register_time_sampler' (did you mean 'register_time_samplers'?)"
        assert "never" not in get_registry().names("time_sampler")
    assert "typo" not in load_plugins().failures


def test_plugin_loading_is_fast(minfm):
    """Plugin modules import no heavy package: loading all of them stays well under a second."""
    code = (
        "import sys, time; t = time.perf_counter();"
        "from minfm_core.plugins import load_plugins; load_plugins();"
        "dt = time.perf_counter() - t;"
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'gradio') if m in sys.modules];"
        "print(dt, heavy)"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert float(out[0]) < 1.0
    assert out[1].strip() == "[]"


def test_uninstalled_checkout_registers_builtins_by_module_name(tmp_path):
    """From a checkout that was never pip-installed, the built-ins still load (same list)."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, site_without_minfm

    checkout = tmp_path / "checkout"
    for part in ("minfm_core", "plugins", "hub", "apps"):
        shutil.copytree(ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    deps = site_without_minfm(tmp_path)
    code = (
        "import json; from minfm_core.plugins import load_plugins; s = load_plugins();"
        "print(json.dumps(sorted(s.origins)))"
    )
    res = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": f"{checkout}{os.pathsep}{deps}", "PATH": os.environ["PATH"]},
    )
    assert res.returncode == 0, res.stderr
    expected = sorted(PYPROJECT_EPS())
    assert json.loads(res.stdout) == expected


def PYPROJECT_EPS():
    from conftest import ROOT
    from minfm_core.recipe.toml import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["minfm"]


def _typed_fields():
    """(component, field name, type) of every config field of every registered component."""
    import attrs

    out = []
    for comp in get_registry().all_components():
        if comp.config is None:
            continue
        for name, tp in typing.get_type_hints(comp.config).items():
            if name in attrs.fields_dict(comp.config):
                out.append((comp, name, tp))
    return out


def test_listed_types_show_choices_and_inner_types():
    """Generated from the registry: no field is shown as a bare Literal, Optional or tuple."""

    from minfm_core.config import describe_fields

    seen = set()
    for comp, name, tp in _typed_fields():
        (shown,) = [f["type"] for f in describe_fields(comp.config) if f["name"] == name]
        assert shown not in {"Literal", "Optional", "Union", "tuple"}, (comp.name, name, shown)
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Literal:
            assert shown == " | ".join(map(repr, args)), (comp.name, name)
            seen.add("literal")
        elif type(None) in args:
            assert shown.endswith(" | None") and shown != "None | None", (comp.name, name)
            seen.add("optional")
        elif typing.get_origin(tp) is tuple:
            assert shown.startswith("tuple[") and shown.endswith("]"), (comp.name, name)
            seen.add("tuple")
    assert seen == {"literal", "optional", "tuple"}  # the built-ins have each kind


def test_flux_ae_fields_as_listed():
    from minfm_core.config import describe_fields

    fields = {f["name"]: f["type"] for f in describe_fields(get_registry().get("vae", "flux_ae").config)}
    assert fields["dtype"] == "'fp32' | 'bf16' | 'fp16'"
    assert fields["pretrained"] == "str | None"
    assert fields["block_out_channels"] == "tuple[int, ...]"


def test_each_plugins_commands_are_listed_under_it():
    from conftest import minfm_in_process as minfm

    res = minfm("plugins", "--json")
    assert res.returncode == 0, res.stderr
    commands = {p["name"]: p["commands"] for p in json.loads(res.stdout)["plugins"]}
    assert commands["hub"] == ["hub"] and commands["flow"] == []
    human = minfm("plugins").stdout
    hub_line = human.splitlines().index(next(line for line in human.splitlines() if line.startswith("  hub ")))
    assert human.splitlines()[hub_line + 1].strip() == "commands: minfm hub"


@pytest.mark.parametrize("name, factory, why", [
    (123, "os:getcwd", "time_sampler name 123: expected 1-64 letters"),
    ("", "os:getcwd", "time_sampler name '': expected"),
    ("has space", "os:getcwd", "time_sampler name 'has space': expected"),
    ("x" * 65, "os:getcwd", "expected 1-64 letters"),
    ("num", 42, "time_sampler 'num': the factory must be callable or a 'module:attribute' string, not int"),
    ("nocolon", "os.getcwd", "time_sampler 'nocolon': factory 'os.getcwd' has no ':'; a lazy factory is "
                             "'module:attribute'"),
], ids=["int", "empty", "space", "long", "number-factory", "no-colon"])
def test_a_bad_name_or_factory_skips_the_plugin_at_registration(name, factory, why):
    class Bad:
        @hookimpl
        def register_time_samplers(self, register):
            register(name, factory)

    with plugin(Bad(), "bad") as state:
        assert why in state.failures["bad"], state.failures
        assert "uniform" in get_registry().names("time_sampler")  # the others still load
    assert all(isinstance(n, str) for n in get_registry().names("time_sampler"))


def test_a_config_instance_for_its_class_says_so():
    """It said "its field types do not resolve (TypeError: ... is not a module, class, ...)"."""
    from minfm_core import config, field

    @config
    class Cfg:
        k: int = field(1, doc="k")

    reg = Registry()
    with pytest.raises(PluginError, match=r"^time_sampler 'inst': config must be a class, got an instance of Cfg "
                                          r"\(pass the class itself\)$"):
        reg.registrar("time_sampler", "probe")("inst", lambda cfg: None, Cfg())


def test_a_name_registered_twice_by_one_plugin_says_so():
    reg = Registry()
    reg.registrar("time_sampler", "probe")("twice", lambda cfg: None)
    with pytest.raises(PluginError, match=r"^time_sampler 'twice' is registered twice by plugin 'probe'$"):
        reg.registrar("time_sampler", "probe")("twice", lambda cfg: None)


def test_a_built_object_missing_a_member_names_its_plugin():
    class PlainDataset:  # does not inherit protocols.Dataset: no set_epoch, no prompt
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"prompt": "x"}

    class Plain:
        @hookimpl
        def register_datasets(self, register):
            register("plain", lambda *, split="train": PlainDataset())

    with plugin(Plain(), "probe"):
        with pytest.raises(PluginError) as info:
            get_registry().get("dataset", "plain").build(split="train")
    assert str(info.value) == ("dataset 'plain' of plugin 'probe': built PlainDataset lacks prompt, set_epoch "
                               "(inherit minfm_core.protocols.Dataset for their defaults)")


@pytest.mark.parametrize("hook_body, why", [
    ("raise RuntimeError('check crashed')", "hook check_recipe raised RuntimeError: check crashed"),
    ("return 'data: a string, not a list'", "hook check_recipe returned str, not a list of strings"),
], ids=["raises", "returns-a-string"])
def test_a_broken_check_recipe_skips_its_plugin_and_fails_recipes_using_it(hook_body, why):
    from engine_helpers import TINY
    from minfm_core.recipe import load_recipe

    namespace: dict = {}
    exec(f"def check_recipe(recipe, world_size):\n    {hook_body}\n", namespace)

    class Probe:
        check_recipe = staticmethod(hookimpl(namespace["check_recipe"]))

        @hookimpl
        def register_time_samplers(self, register):
            register("probe_uniform", get_registry().get("time_sampler", "uniform").factory,
                     get_registry().get("time_sampler", "uniform").config)

    with plugin(Probe(), "probe") as state:
        load_recipe(TINY)  # a recipe without its components: loads, with a warning
        assert state.failures["probe"] == why
        assert "probe_uniform" not in get_registry().names("time_sampler")  # skipped whole
    with plugin(Probe(), "probe"):
        with pytest.raises(RecipeError) as info:
            load_recipe(TINY, ["flow.time_sampler.name=probe_uniform"])
    assert f"flow.time_sampler: time_sampler 'probe_uniform' of plugin 'probe' was skipped: {why}" in str(info.value)


def test_seed_ranges_are_printed_exactly():
    from minfm_core.validators import MAX_SEED, SEED

    assert SEED.range_text == f"in [0, {MAX_SEED}]" == "in [0, 9223372036854775807]"


def test_a_factory_that_raises_is_named_under_its_traceback():
    """A plugin factory's own bug kept its traceback, but its last line named neither the
    component nor the plugin."""
    from minfm_core import hookimpl

    def broken(cfg=None):
        raise ZeroDivisionError("oops")

    class Broken:
        @hookimpl
        def register_guidances(self, register):
            register("broken", broken)

    with plugin(Broken(), "probe"):
        with pytest.raises(ZeroDivisionError) as info:
            get_registry().get("guidance", "broken").build()
    assert info.value.__notes__ == ["(raised by the factory of guidance 'broken' of plugin 'probe')"]


def _bad_configs():
    import attrs

    from minfm_core import config, field

    @attrs.define(kw_only=True)  # attrs, but mutable
    class Mutable:
        k: int = field(1, doc="k")

    @config
    class Listed:
        ks: list[int] = field(factory=list, doc="a list: recipes give tuples")

    @config
    class Undocumented:
        k: int = 3

    @config
    class WrongDefault:
        k: int = field(2.5, doc="an int that is not")

    @config
    class Unioned:
        k: int | str = field(1, doc="either")

    @config
    class ListForTuple:
        ks: tuple[int, ...] = field([1, 2], doc="a list where the recipe gives a tuple")

    @config
    class ShortTuple:
        ks: tuple[int, int, int] = field((1, 2), doc="two of three")

    @config
    class NotAChoice:
        k: typing.Literal["a", "b"] = field("c", doc="not one of them")

    @config
    class OptionalWrong:
        k: float | None = field("x", doc="a float or nothing")

    return [
        (Mutable, "must be frozen"),
        (Listed, "field 'ks': type list is not one a recipe can give"),
        (Undocumented, "field 'k': declare it with minfm_core.field(default, doc=...)"),
        (WrongDefault, "field 'k': default 2.5 is not of type int"),
        (Unioned, "field 'k': int | str: only X | None unions"),
        (ListForTuple, "field 'ks': default [1, 2] is not of type tuple[int, ...]"),
        (ShortTuple, "field 'ks': default (1, 2) is not of type tuple[int, int, int]"),
        (NotAChoice, "field 'k': default 'c' is not of type 'a' | 'b'"),
        (OptionalWrong, "field 'k': default 'x' is not of type float | None"),
    ]


@pytest.mark.parametrize("cls, why", _bad_configs(), ids=lambda v: getattr(v, "__name__", ""))
def test_a_config_against_the_documented_rules_skips_its_plugin(cls, why):
    """They were taken: a mutable config, a list field (a recipe's array arrived as a list), an
    int field whose default 2.5 reached the component as is."""
    from minfm_core import hookimpl

    class Bad:
        @hookimpl
        def register_guidances(self, register):
            register("bad", lambda cfg: None, cls)

    with plugin(Bad(), "probe"):
        state = load_plugins()
        assert why in state.failures["probe"], state.failures
        assert "bad" not in get_registry().names("guidance")


def test_every_builtin_config_keeps_the_rules():
    from minfm_core.config import config_problems

    for comp in get_registry().all_components():
        if comp.config is not None:
            assert config_problems(comp.config) == [], comp.describe()


def test_a_component_of_a_skipped_plugin_is_not_called_unknown():
    """A recipe naming a good component of a plugin skipped for a name clash read 'unknown
    guidance', as for a typo."""
    from minfm_core import hookimpl
    from minfm_core.errors import UnknownComponentError

    class Clash:
        @hookimpl
        def register_guidances(self, register):
            register("clash_ok", lambda cfg=None: None)
            register("cfg", lambda cfg=None: None)  # the built-in's name: the plugin is skipped

    with plugin(Clash(), "probe"):
        assert "registered by both plugin" in load_plugins().failures["probe"]
        with pytest.raises(UnknownComponentError, match="guidance 'clash_ok' belongs to plugin 'probe', which was skipped"):
            get_registry().get("guidance", "clash_ok")


def test_check_refuses_a_model_whose_built_module_breaks_the_contract(capsys):
    """`minfm check` builds the model slots on meta: a module lacking a protocol member fails
    the check (run would stop on it at start-up), it is not a footnote in the summary."""
    import argparse

    from engine_helpers import TINY
    from minfm_core.cli import check_cmd

    identity = get_registry().get("vae", "identity")

    class EncodeOnly:  # no decode
        def encode(self, images):
            return list(images)

    class Probe:
        @hookimpl
        def register_vaes(self, register):
            register("encode_only", lambda cfg, **kw: EncodeOnly(), identity.config)

    args = argparse.Namespace(recipe=TINY, overrides=["model.vae.name=encode_only"], world_size=None, print_recipe=False)
    with plugin(Probe(), "probe"):
        with pytest.raises(RecipeError) as info:
            check_cmd.run(args)
        assert info.value.problems == ["model.vae: vae 'encode_only' of plugin 'probe': built EncodeOnly lacks decode "
                                       "(required: define decode)"]
        args.overrides = []
        assert check_cmd.run(args) == 0  # the same recipe with identity passes
    assert "ok (job = 'train')" in capsys.readouterr().out
