"""A broken sibling plugin never takes minFM down: it is skipped, named once, listed as broken.

Each way a plugin can break is a real installed distribution (a folder with its
.dist-info on PYTHONPATH, as pip would leave it), all installed side by side with the
working built-ins; ``minfm --version``, ``minfm plugins`` and ``minfm check`` still work.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from minfm_core import config, hookimpl
from minfm_core.errors import PluginError
from minfm_core.plugins import load_plugins, plugin
from minfm_core.registry import FACTORY_KWARGS, get_registry

HEAD = "from minfm_core import hookimpl\n"

#: plugin name -> (module source, the reason `minfm plugins` must give, in part).
BROKEN = {
    "bad_import": ("import minfm_no_such_module\n", "ModuleNotFoundError: No module named 'minfm_no_such_module'"),
    "bad_argname": (
        HEAD + "@hookimpl\ndef register_time_samplers(regster):\n    pass\n",
        "Argument(s) {'regster'} are declared in the hookimpl but can not be found in the hookspec",
    ),
    "raising_hook": (
        HEAD + "@hookimpl\ndef register_loggers(register):\n    raise ValueError('no loggers today')\n",
        "hook register_loggers raised ValueError: no loggers today",
    ),
    "raising_command": (
        HEAD + "@hookimpl\ndef register_commands(subparsers):\n"
        "    subparsers.add_parser('half-added')\n    raise KeyError('oops')\n",
        "hook register_commands raised KeyError: 'oops'",
    ),
    # Under a shared group (an existing one and one of its own), then raises.
    "raising_group_command": (
        HEAD + "from minfm_core.cli.groups import command_group\n@hookimpl\ndef register_commands(subparsers):\n"
        "    command_group(subparsers, 'data').add_parser('half-data')\n"
        "    command_group(subparsers, 'half-group').add_parser('inner')\n    raise KeyError('oops')\n",
        "hook register_commands raised KeyError: 'oops'",
    ),
    # Sorts before `flow`, yet the built-in keeps its name: minFM's own plugins load first.
    "aaa_clash": (
        HEAD + "@hookimpl\ndef register_time_samplers(register):\n    register('uniform', 'os:getcwd')\n",
        "time_sampler 'uniform' is registered by both plugin 'flow' and plugin 'aaa_clash'",
    ),
}


def install(site: Path, name: str, source: str) -> None:
    """A distribution ``minfm-<name>`` whose entry point ``<name>`` is module ``minfm_<name>``."""
    (site / f"minfm_{name}").mkdir(parents=True)
    (site / f"minfm_{name}" / "__init__.py").write_text(source)
    info = site / f"minfm_{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: minfm-{name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[minfm]\n{name} = minfm_{name}\n")


#: Only `minfm check` calls check_recipe, so only it can find this one broken.
RAISING_CHECK = HEAD + "@hookimpl\ndef check_recipe(recipe, world_size):\n    raise RuntimeError('check crashed')\n"

#: A working plugin that adds a command to the group a built-in makes. pluggy calls the plugin
#: registered last first: named to sort after raising_group_command, its hook runs before
#: that one's, so the group already exists when raising_group_command adds to it and raises.
GROUP_MEMBER = HEAD + textwrap.dedent("""
    from minfm_core.cli.groups import command_group

    @hookimpl
    def register_commands(subparsers):
        command_group(subparsers, "data").add_parser("extra", help="a third party's dataset")
""")

TYPO_FACTORY = HEAD + textwrap.dedent("""
    @hookimpl
    def register_time_samplers(register):
        register("typo", "minfm_typo_factory.sampler:Nope")
""")


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory):
    import os

    site = tmp_path_factory.mktemp("site")
    for name, (source, _) in BROKEN.items():
        install(site, name, source)
    install(site, "typo_factory", TYPO_FACTORY)
    install(site, "zz_group_member", GROUP_MEMBER)
    install(site, "raising_check", RAISING_CHECK)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_version_survives_broken_siblings(minfm, broken_env):
    res = minfm("--version", env=broken_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("minfm ")
    # The command a raising register_commands added before it raised went with its plugin.
    res = minfm("half-added", env=broken_env)
    assert res.returncode == 2 and "invalid choice: 'half-added'" in res.stderr
    # Also what it added under groups: the built-in group keeps its own commands, its own group goes.
    for argv, gone in ((["data", "half-data"], "half-data"), (["half-group", "inner"], "half-group")):
        res = minfm(*argv, env=broken_env)
        assert res.returncode == 2 and f"invalid choice: '{gone}'" in res.stderr, res.stderr
    res = minfm("data", "extra", "--help", env=broken_env)
    assert res.returncode == 0 and "usage: minfm data extra" in res.stdout, res.stderr


def test_plugins_lists_each_broken_plugin_with_its_reason(minfm, broken_env):
    res = minfm("plugins", "--json", env=broken_env)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    info = json.loads(res.stdout)
    failed = {f["name"]: f["error"] for f in info["failed"]}
    for name, (_, reason) in BROKEN.items():
        assert reason in failed[name], name
        assert "\n" not in failed[name]
        # One warning per broken plugin, naming it.
        assert sum(f"plugin {name!r}" in line for line in res.stderr.splitlines()) == 1, res.stderr
    loaded = {p["name"] for p in info["plugins"]}
    assert not loaded & set(BROKEN) and {"flow", "flux", "loggers"} <= loaded
    # The clash skipped the newcomer, not the built-in.
    (uniform,) = [c for c in info["kinds"]["time_sampler"] if c["name"] == "uniform"]
    assert uniform["plugin"] == "flow"
    # A lazy factory that does not import is listed as broken; working ones are not.
    (typo,) = [c for c in info["kinds"]["time_sampler"] if c["name"] == "typo"]
    assert "factory 'minfm_typo_factory.sampler:Nope' does not import: ModuleNotFoundError" in typo["broken"]
    assert uniform["broken"] is None
    # Each plugin's commands, group members named under their group: whose is whose.
    commands = {p["name"]: p["commands"] for p in info["plugins"]}
    assert commands["zz_group_member"] == ["data extra"] and commands["data"] == ["data imagenet"]
    human = minfm("plugins", env=broken_env).stdout
    assert "      commands: minfm data extra" in human.splitlines()
    assert "BROKEN: ModuleNotFoundError: No module named 'minfm_no_such_module'" in human


def test_autoload_off_loads_only_minfms_own_plugins(minfm, broken_env):
    """MINFM_DISABLE_PLUGIN_AUTOLOAD=1: no third party's entry point is even imported."""
    res = minfm("plugins", "--json", env={**broken_env, "MINFM_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["failed"] == [] and "warning" not in res.stderr
    loaded = {p["name"] for p in info["plugins"]}
    assert {"flow", "flux", "hub", "loggers"} <= loaded
    assert not loaded & (set(BROKEN) | {"typo_factory", "raising_check", "zz_group_member"})


def test_only_sets_the_plugins_and_restores_them():
    from minfm_core.plugins import only

    class One:
        @hookimpl
        def register_time_samplers(self, register):
            register("one", "os:getcwd")

    before = get_registry()
    with only(("one", One())) as state:
        assert get_registry() is state.registry
        assert state.registry.names("time_sampler") == ["one"] and state.registry.names("denoiser") == []
    assert get_registry() is before and "uniform" in before.names("time_sampler")

    class Bad:
        @hookimpl
        def register_time_samplers(self, regster):
            pass

    with pytest.raises(PluginError, match="bad: .*regster"):
        with only(("bad", Bad())):
            pass
    assert get_registry() is before


def test_check_works_and_catches_a_factory_typo(minfm, broken_env):
    res = minfm("check", "recipes/quickstart.toml", env=broken_env)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and ": ok (job = 'train')" in res.stdout
    assert "plugin 'raising_check' skipped: hook check_recipe raised RuntimeError: check crashed" in res.stderr
    res = minfm("check", "recipes/quickstart.toml", "--set", 'flow.time_sampler={name = "typo"}', env=broken_env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(
        "minfm: error: recipes/quickstart.toml: flow.time_sampler.name: time_sampler 'typo' of plugin "
        "'typo_factory': factory 'minfm_typo_factory.sampler:Nope' does not import: ModuleNotFoundError"
    )


@config
class _Empty:
    """Nothing to set."""


class _Signature:
    """A denoiser factory without ``balancer=``: the engine would pass it one."""

    @hookimpl
    def register_denoisers(self, register):
        def build(cfg, *, load_weights=True, attention=None):
            return None

        register("no_balancer", build, _Empty)


def test_factory_signature_is_checked_against_the_engine_keywords():
    with plugin(_Signature(), "sig"):
        comp = get_registry().get("denoiser", "no_balancer")
        problem = comp.factory_problem()
    assert problem is not None
    assert "denoiser 'no_balancer' of plugin 'sig': factory" in problem
    assert problem.endswith("(cfg, *, load_weights=True, attention=None) does not accept the keyword balancer= "
                            "the engine may pass")
    # A run that passes it anyway stops with the same line, not a TypeError from inside.
    with plugin(_Signature(), "sig"), pytest.raises(PluginError) as info:
        get_registry().get("denoiser", "no_balancer").build(load_weights=False, balancer=object())
    assert str(info.value) == problem


def _every_component():
    return [pytest.param(c, id=f"{c.kind}-{c.name}") for c in get_registry().all_components()]


@pytest.mark.parametrize("comp", _every_component())
def test_builtin_factories_take_what_the_engine_passes(comp):
    assert comp.factory_problem() is None


def test_build_refuses_an_undeclared_keyword():
    """The engine can pass only the keywords the table declares (so check cannot miss one)."""
    comp = get_registry().get("time_sampler", "uniform")
    assert not FACTORY_KWARGS["time_sampler"]
    with pytest.raises(TypeError, match="time_sampler factories take no keyword load_weights"):
        comp.build(load_weights=True)


class _RaisingRegister:
    @hookimpl
    def register_paths(self, register):
        register("fine", "os:getcwd")
        raise ZeroDivisionError("halfway")


def test_a_raising_register_hook_leaves_no_component_behind():
    with plugin(_RaisingRegister(), "halfway") as state:
        assert state.failures["halfway"] == "hook register_paths raised ZeroDivisionError: halfway"
        assert "fine" not in get_registry().names("path")
        assert "halfway" not in state.origins
    assert "halfway" not in load_plugins().failures


def test_registry_and_plugins_import_in_one_direction():
    """registry -> plugins -> components: neither lower module imports a higher one, even lazily."""
    import ast

    from conftest import ROOT

    def imported(name: str) -> set[str]:
        tree = ast.parse((ROOT / "minfm_core" / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minfm_core"):
                found.add(node.module.split(".", 1)[-1])
        return found

    assert "plugins" in imported("registry")
    assert not {"registry", "recipe", "recipe.toml"} & imported("plugins")
    assert not {"registry", "plugins"} & imported("components")


def test_a_factory_import_error_over_several_lines_is_shown_whole(tmp_path, monkeypatch):
    """A failed class layout (``Cannot create a consistent method resolution\\norder (MRO) for
    bases ...``) was listed cut at its first line, the bases it names lost."""
    from minfm_core import hookimpl
    from minfm_core.plugins import plugin
    from minfm_core.registry import get_registry

    (tmp_path / "minfm_two_line_factory.py").write_text("raise TypeError('Cannot create a consistent method "
                                                        "resolution\\norder (MRO) for bases A, B')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class TwoLines:
        @hookimpl
        def register_samplers(self, register):
            register("two_lines", "minfm_two_line_factory:Sampler")

    with plugin(TwoLines(), "two_lines"):
        problem = get_registry().get("sampler", "two_lines").factory_problem()
    assert problem.endswith("does not import: TypeError: Cannot create a consistent method resolution order (MRO) "
                            "for bases A, B"), problem
