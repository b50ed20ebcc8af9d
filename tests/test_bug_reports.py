"""A bug's last line says whose code raised it (``plugins.whose_code``), so that the report
goes to a third-party plugin's authors rather than to minFM's, and the other way round."""

from __future__ import annotations

import errno
import json
import textwrap

import pytest

import minfm_core
from conftest import ROOT, minfm_in_process, run_minfm
from minfm_core import plugins
from minfm_core.cli.main import _raised_in
from minfm_core.errors import MinfmError
from minfm_plugins.attention.backends import length_buckets
from minfm_core.cli.main import bug_report_line
from minfm_core.data_loader import BatchIterator
from minfm_core.safepath import file_in_the_way


TINY = ROOT / "tests" / "recipes" / "tiny.toml"


class _Probe:
    """A plugin object: this test module is its package."""


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except Exception as exc:
        return exc
    raise AssertionError("nothing raised")


def test_the_innermost_frame_of_minfm_or_of_a_plugin_decides():
    in_core = _raised(file_in_the_way, None, "x")  # TypeError raised in os.path, called by minFM
    in_library = _raised(json.loads, "{")  # raised in json, called by this module
    in_builtin = _raised(length_buckets, None)  # raised in one of minFM's own plugins
    with plugins.plugin(_Probe(), "probe"):
        assert plugins.whose_code(in_core) == "minFM"
        assert plugins.whose_code(in_builtin) == "minFM"
        assert plugins.whose_code(in_library) == "plugin 'probe'"
        assert bug_report_line(in_library) == (
            "minfm: this is a bug in plugin 'probe', whose code raised it; please report it to its authors "
            "with the traceback above")
    # no longer a plugin: this module is nobody's code
    assert plugins.whose_code(in_library) is None
    assert bug_report_line(in_library).endswith("a bug in minFM or one of its plugins; please report it with "
                                                "the traceback above")
    assert bug_report_line(in_core) == "minfm: this is a bug in minFM; please report it with the traceback above"


class _BuggyData:
    def __len__(self):
        return 2

    def set_epoch(self, epoch):
        pass

    def __getitem__(self, i):
        return {}["image"]  # the bug, raised in a DataLoader worker


def test_a_bug_in_a_dataloader_worker_is_read_from_the_workers_traceback():
    """torch re-raises a worker's exception from its own frames, minFM's loader under them (the
    innermost code of minFM's or a plugin's there): the worker's traceback, kept in the message,
    says whose code it was."""
    exc = _raised(next, BatchIterator(_BuggyData(), 1, shuffle=False, num_workers=1))
    assert "Original Traceback" in str(exc)
    with plugins.plugin(_Probe(), "probe"):
        assert plugins.whose_code(exc) == "plugin 'probe'"


def test_an_installed_plugins_bug_mid_run_names_it_and_its_distribution(tmp_path):
    """A bug in a component's method (here a time sampler's ``__call__``, at the first step) has
    no note naming its plugin; the last line does."""
    pkg = tmp_path / "acme_minfm"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import pluggy

        hookimpl = pluggy.HookimplMarker("minfm")


        @hookimpl
        def register_time_samplers(register):
            register("acme_bad", "acme_minfm.parts:BadSampler")
    '''))
    (pkg / "parts.py").write_text(textwrap.dedent('''
        import torch


        class BadSampler:
            def __call__(self, n, *, generator=None, device=None):
                return torch.rand(n, generator=generator).view(n + 1)  # the bug: raised inside torch
    '''))
    info = tmp_path / "acme_minfm-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-minfm\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[minfm]\nacme = acme_minfm\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"extends = {str(TINY)!r}\n[run]\nexp_dir = {str(tmp_path / 'exp')!r}\n"
                      "[flow.time_sampler]\nname = \"acme_bad\"\n[train]\nmax_steps = 1\nckpt_every = 0\n")
    res = run_minfm("run", str(recipe), env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 1, res.stderr[-2000:]
    *_, error, last = res.stderr.strip().splitlines()
    assert error.startswith("RuntimeError: shape") and "acme_minfm/parts.py" in res.stderr
    assert last == ("minfm: this is a bug in plugin 'acme' (distribution acme-minfm), whose code raised it; "
                    "please report it to its authors with the traceback above")


def test_a_bug_in_a_factorys_module_outside_the_plugins_package_is_the_plugins(tmp_path, monkeypatch):
    """A plugin whose entry point is a top-level module (``acme_hooks``) may name a sibling
    module in a lazy factory (``"acme_parts:Bad"``): a bug there was called minFM's."""
    import importlib
    import sys

    from minfm_core.registry import get_registry

    (tmp_path / "probe_hooks_elsewhere.py").write_text(textwrap.dedent('''
        from minfm_core import hookimpl


        @hookimpl
        def register_time_samplers(register):
            register("probe_bad", "probe_parts_elsewhere:Bad")
    '''))
    (tmp_path / "probe_parts_elsewhere.py").write_text(textwrap.dedent('''
        class Bad:
            def __call__(self, n, *, generator=None, device=None):
                return {}["t"]  # the bug
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("probe_hooks_elsewhere", "probe_parts_elsewhere"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with plugins.plugin(importlib.import_module("probe_hooks_elsewhere"), "probe"):
        exc = _raised(get_registry().get("time_sampler", "probe_bad").build(), 1)
        assert plugins.whose_code(exc) == "plugin 'probe'"


class _Refusing:
    """A time sampler whose own checks refuse, with the user's kind of error."""

    def __init__(self, cfg):
        self.fault = cfg.fault

    def __call__(self, n, *, generator=None, device=None):
        if self.fault == "minfm":
            raise MinfmError("the time sampler refuses")
        if self.fault == "helper":  # raised in minFM's own helper, on the plugin's behalf
            from minfm_core.jsonio import read_json_file

            read_json_file("/nonexistent/schedule.json", "schedule", 1 << 20)
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nonexistent/schedule.json")


@minfm_core.config
class _FaultConfig:
    fault: str = minfm_core.field("minfm", doc="which error")


class _RefusingPlugin:
    @minfm_core.hookimpl
    def register_time_samplers(self, register):
        register("refusing", _Refusing, _FaultConfig)


@pytest.mark.parametrize("fault, line", [
    ("minfm", "minfm: error: the time sampler refuses (raised in plugin 'refusing')"),
    ("oserror", "minfm: error: /nonexistent/schedule.json: No such file or directory (raised in plugin 'refusing')"),
    ("helper", "minfm: error: schedule: No such file or directory (raised in plugin "
               "'refusing')"),
])
def test_a_plugins_own_refusal_mid_run_says_whose_it_is(tmp_path, fault, line):
    """A MinfmError or OSError is the user's to fix: one line, no traceback. Raised by a
    third-party component mid-run it named nothing, and the user could not tell which of the
    recipe's components spoke; minFM's own errors stay as they are."""
    with plugins.plugin(_RefusingPlugin(), "refusing"):
        res = minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={str(tmp_path / 'exp')!r}",
                               "--set", f'flow.time_sampler={{name = "refusing", fault = "{fault}"}}',
                               "--set", "train.max_steps=1")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == line
    in_core = _raised(file_in_the_way, None, "x")
    assert _raised_in(in_core) == "" and _raised_in(MinfmError("x")) == ""  # minFM's, or no frame at all
