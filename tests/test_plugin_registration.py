"""Registration as docs/plugins.md describes it: names two plugins claim, entry points named like
a loaded plugin, configs whose defaults break their own ranges, the register callback's
arguments, what check_recipe hooks and plugin commands may return."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from minfm_core import MinfmError, config, field, hookimpl, protocols
from minfm_core.components import KINDS
from minfm_core.errors import PluginError, RecipeError
from minfm_core.plugins import load_plugins, plugin
from minfm_core.registry import get_registry
from minfm_core.validators import Range


# ---- a name two third parties claim (item: squatting) ---------------------------------------


def _sampler_plugin(*names):
    class P:
        @hookimpl
        def register_time_samplers(self, register):
            uniform = get_registry().get("time_sampler", "uniform")
            for name in names:
                register(name, uniform.factory, uniform.config)

    return P()


def test_a_name_two_third_parties_claim_goes_to_neither():
    """The plugin that loaded first (by entry-point name) kept the name and the other was
    skipped whole: any plugin could squat another's names. Now both keep their other
    components; a recipe naming the contested one is told both names and how to pick."""
    with plugin(_sampler_plugin("shared", "aaa_own"), "aaa"), plugin(_sampler_plugin("shared", "zzz_own"), "zzz"):
        state = load_plugins()
        assert "aaa" not in state.failures and "zzz" not in state.failures
        names = get_registry().names("time_sampler")
        assert {"aaa_own", "zzz_own"} <= set(names) and "shared" not in names
        assert get_registry().contested() == {("time_sampler", "shared"): ["aaa", "zzz"]}
        with pytest.raises(PluginError) as info:
            get_registry().get("time_sampler", "shared", path="flow.time_sampler.name")
        from minfm_core.cli.plugins_cmd import collect

        assert collect()["contested"] == [{"kind": "time_sampler", "name": "shared", "plugins": ["aaa", "zzz"]}]
    assert str(info.value) == ("flow.time_sampler.name: time_sampler 'shared' is registered by both plugin 'aaa' and "
                               "plugin 'zzz', so by neither; keep one with MINFM_DISABLE_PLUGINS=zzz (or aaa)")


def test_a_builtin_name_still_skips_the_third_party_whole():
    with plugin(_sampler_plugin("uniform", "mine"), "probe"):
        assert "registered by both plugin 'flow' and plugin 'probe'" in load_plugins().failures["probe"]
        assert get_registry().get("time_sampler", "uniform").plugin == "flow"


def test_an_isolated_registry_refuses_two_plugins_claiming_one_name():
    from minfm_core import testing

    with pytest.raises(AssertionError, match="time_sampler 'shared' by a, b"):
        with testing.isolated_registry(("a", _sampler_plugin("shared")), ("b", _sampler_plugin("shared"))):
            pass


# ---- entry points named like a loaded plugin ---------------------------------------------------


def _dist(site: Path, dist: str, entry: str, module: str, source: str) -> None:
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(source)
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[minfm]\n{entry} = {module}\n")


DUPE = ("from minfm_core import hookimpl\n@hookimpl\ndef register_time_samplers(register):\n"
        "    register('dupe_uniform', 'minfm_plugins.flow.time:UniformTimeSampler')\n")


def test_an_entry_point_named_like_a_builtin_is_listed_and_can_be_told_apart(minfm, tmp_path):
    """A third party's entry point `loggers` was skipped but listed nowhere (minfm plugins, --json
    failed), and MINFM_DISABLE_PLUGINS=loggers blocked both."""
    _dist(tmp_path, "minfm-dupe", "loggers", "minfm_dupe", DUPE)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def listing(**extra):
        res = minfm("plugins", "--json", env={**env, **extra})
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
        info = json.loads(res.stdout)
        samplers = {c["name"]: c["plugin"] for c in info["kinds"]["time_sampler"]}
        return info, samplers, {c["name"] for c in info["kinds"]["logger"]}, res.stderr

    info, samplers, loggers, stderr = listing()
    (failed,) = [f for f in info["failed"] if f["name"] == "minfm-dupe:loggers"]
    assert failed["error"].startswith("one of minFM's own plugins is already named 'loggers'")
    assert "MINFM_DISABLE_PLUGINS=minfm:loggers" in failed["error"]
    assert "plugin 'minfm-dupe:loggers'" in stderr and "console" in loggers and "dupe_uniform" not in samplers
    info, samplers, loggers, _ = listing(MINFM_DISABLE_PLUGINS="minfm-dupe:loggers")  # just the third party's
    assert info["failed"] == [] and "console" in loggers
    info, samplers, loggers, _ = listing(MINFM_DISABLE_PLUGINS="minfm:loggers")  # just minFM's own
    assert info["failed"] == [] and samplers["dupe_uniform"] == "loggers" and "console" not in loggers


# ---- configs and the register callback -------------------------------------------------------


@config
class OutsideDefault:
    """A default its own range refuses."""

    slope: float = field(5.0, doc="slope", validator=Range(-1, 1))


@config
class Required:
    """A field the recipe must set."""

    slope: float = field(doc="slope", validator=Range(-1, 1))


def _weighter(cls):
    class P:
        @hookimpl
        def register_time_weighters(self, register):
            register("probe_w", "minfm_plugins.flow.time:UniformWeight", cls)

    return P()


def test_a_default_outside_its_own_range_skips_the_plugin_at_registration():
    """It was accepted, and every recipe leaving the field unset was refused for a value the
    user never wrote."""
    with plugin(_weighter(OutsideDefault), "probe"):
        assert load_plugins().failures["probe"] == (
            "config of time_weighter 'probe_w': field 'slope': default 5.0 is outside its own range "
            "(must be in [-1, 1], got 5.0)")
        assert "probe_w" not in get_registry().names("time_weighter")


def test_a_required_field_is_the_recipes_to_set():
    """A field without a default is allowed (docs/plugins.md): a recipe that leaves it out is
    refused by its path."""
    from engine_helpers import TINY
    from minfm_core.recipe import load_recipe

    with plugin(_weighter(Required), "probe"):
        assert "probe" not in load_plugins().failures
        with pytest.raises(RecipeError, match=r"flow\.time_weighter\.slope: missing required key"):
            load_recipe(TINY, ['flow.time_weighter={name = "probe_w"}'])
        assert load_recipe(TINY, ['flow.time_weighter={name = "probe_w", slope = 0.5}'])


def test_a_metric_doc_passed_as_the_third_argument_is_explained():
    """register(name, factory, "doc"), as the docs once wrote the metric callback, made the doc
    the config: "must be an attrs class"."""
    class Positional:
        @hookimpl
        def register_metrics(self, register):
            register("probe_metric", "os:getcwd", "A probe metric.")

    class Keyword:
        @hookimpl
        def register_metrics(self, register):
            register("probe_metric", "os:getcwd", doc="A probe metric.")

    with plugin(Positional(), "probe"):
        assert load_plugins().failures["probe"] == (
            "metric 'probe_metric': config 'A probe metric.' is a string, not a config class; pass a doc by "
            "keyword: register(name, factory, doc=...)")
    with plugin(Keyword(), "probe"):
        assert get_registry().get("metric", "probe_metric").doc == "A probe metric."


@pytest.mark.parametrize("kind", sorted(protocols.CONFIGLESS_KINDS))
def test_a_config_given_to_a_configless_kind_skips_the_plugin(kind):
    """A source or metric is never configured: a config class registered with one would be
    silently ignored, so it is refused by name."""
    @config
    class Cfg:
        """A config the engine would never structure."""

        x: int = field(1, doc="x", validator=Range(0, 9))

    class P:
        pass

    def hook(self, register):
        register("probe_thing", "os:getcwd", Cfg)

    setattr(P, KINDS[kind], hookimpl(hook))
    with plugin(P(), "probe"):
        why = load_plugins().failures["probe"]
        assert why.startswith(f"{kind} 'probe_thing': a {kind} is registered without a config"), why
        assert "probe_thing" not in get_registry().names(kind)


@pytest.mark.parametrize("kind", sorted(protocols.CONFIG_PROTOCOLS))
def test_a_config_without_what_the_engine_reads_skips_the_plugin(kind):
    """A VAE config without latent_channels registered, passed `minfm check`, then failed the
    first batch with an AttributeError blamed on minFM."""
    needed = list(protocols.CONFIG_PROTOCOLS[kind].__annotations__)

    @config
    class Cfg:
        """Has all but the first attribute the engine reads (the rest as properties)."""

        x: int = field(1, doc="x")

    for name in needed[1:]:
        setattr(Cfg, name, property(lambda self: (1, 1, 1)))

    for cfg, lacks in ((Cfg, needed[:1]), (None, needed)):
        class P:
            pass

        def hook(self, register, cfg=cfg):
            register("probe_thing", "os:getcwd", cfg)

        setattr(P, KINDS[kind], hookimpl(hook))
        with plugin(P(), "probe"):
            why = load_plugins().failures["probe"]
            assert why.startswith(f"{kind} 'probe_thing': its config must have {' and '.join(lacks)}, as a field or "
                                  "a property"), why
            assert "probe_thing" not in get_registry().names(kind)


def test_a_raising_register_hook_is_named():
    class Raising:
        @hookimpl
        def register_loggers(self, register):
            raise RuntimeError("boom")

    with plugin(Raising(), "probe"):
        assert load_plugins().failures["probe"] == "hook register_loggers raised RuntimeError: boom"


# ---- check_recipe ----------------------------------------------------------------------------


def _checker(result):
    class P:
        @hookimpl
        def check_recipe(self, recipe, world_size):
            return result(recipe)

    return P()


@pytest.mark.parametrize("result, problems", [
    (lambda r: None, []),
    (lambda r: ("flow.time_sampler: a tuple works",), ["flow.time_sampler: a tuple works"]),
    (lambda r: [f"flow.time_sampler: filled by {r.get('flow.time_sampler').component.name}"],
     ["flow.time_sampler: filled by logit_normal"]),
], ids=["none", "tuple", "which-component"])
def test_check_recipe_results_the_docs_accept(result, problems):
    from engine_helpers import TINY
    from minfm_core.recipe import load_recipe

    with plugin(_checker(result), "probe") as state:
        if problems:
            with pytest.raises(RecipeError) as info:
                load_recipe(TINY)
            assert info.value.problems == problems
        else:
            load_recipe(TINY)
        assert "probe" not in state.failures


@pytest.mark.parametrize("result, why", [
    (lambda r: [1, 2], "hook check_recipe returned a list holding int 1, not only strings"),
    (lambda r: ["ok", None], "hook check_recipe returned a list holding NoneType None, not only strings"),
    (lambda r: "data: a string", "hook check_recipe returned str, not a list of strings"),
], ids=["ints", "a-none-inside", "string"])
def test_check_recipe_results_that_skip_the_plugin(result, why):
    from engine_helpers import TINY
    from minfm_core.recipe import load_recipe

    with plugin(_checker(result), "probe") as state:
        load_recipe(TINY)
        assert state.failures["probe"] == why


# ---- plugin commands -------------------------------------------------------------------------


class _Commands:
    @hookimpl
    def register_commands(self, subparsers):
        def bug(args):
            raise ValueError("a bug")

        def refuse(args):
            raise MinfmError("probe-refuse: fix your input")

        for name, func in (("probe-junk", lambda args: "junk"), ("probe-none", lambda args: None),
                           ("probe-three", lambda args: 3), ("probe-bug", bug), ("probe-refuse", refuse)):
            subparsers.add_parser(name).set_defaults(func=func)


@pytest.mark.parametrize("command, code, err", [
    ("probe-junk", 2, "minfm: error: the command 'minfm probe-junk' of plugin 'probe' returned 'junk', not an exit "
                      "code (an int, or None for 0)"),
    ("probe-none", 0, ""),
    ("probe-three", 3, ""),
    ("probe-refuse", 2, "minfm: error: probe-refuse: fix your input (raised in plugin 'probe')"),
], ids=["junk", "none", "int", "minfm-error"])
def test_what_a_plugin_command_returns_is_its_exit_code(command, code, err, capsys):
    """A command returning "junk" crashed in the CLI's int() with a traceback naming no plugin."""
    from minfm_core.cli.main import main

    with plugin(_Commands(), "probe"):
        assert main([command]) == code
    assert capsys.readouterr().err.strip() == err


def test_a_plugin_commands_bug_keeps_its_traceback_and_names_the_plugin(capsys):
    from minfm_core.cli.main import main

    with plugin(_Commands(), "probe"):
        assert main(["probe-bug"]) == 1
    err = capsys.readouterr().err
    assert "ValueError: a bug\n(raised by the command 'minfm probe-bug' of plugin 'probe')" in err
