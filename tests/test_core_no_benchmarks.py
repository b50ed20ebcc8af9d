"""The core names no benchmark: ImageNet and evaluation are plugins reached through generic hooks."""

from __future__ import annotations

import argparse
import json

import pytest

from conftest import ROOT, run_minfm
from engine_helpers import TINY
from eval_helpers import images, save_npz
from minfm_core import hookimpl
from minfm_core.cli.groups import command_group
from minfm_core.cli.main import main
from minfm_core.errors import PluginError
from minfm_core.plugins import plugin


def test_no_file_under_the_core_names_imagenet():
    hits = []
    for path in (ROOT / "minfm_core").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            text = path.read_bytes().decode("utf-8", errors="replace")
            hits += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                     if "imagenet" in line.lower()]
    assert not hits, "the core names ImageNet: " + ", ".join(hits)


def test_data_and_eval_commands_come_from_their_plugins():
    res = run_minfm("data", "imagenet", "prepare", "--help", env={"MINFM_DISABLE_PLUGINS": "data,eval"})
    assert res.returncode == 2 and "invalid choice: 'data'" in res.stderr, res.stderr
    res = run_minfm("eval", "folder", "--help", env={"MINFM_DISABLE_PLUGINS": "data,eval"})
    assert res.returncode == 2 and "invalid choice: 'eval'" in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["run", "check"])
def test_in_training_fid_needs_a_plugin_with_the_fid_metric(tmp_path, command):
    """Refused before any work, and by `minfm check` too (it said ok, then the run stopped)."""
    ref = save_npz(tmp_path / "ref.npz", images(4, seed=1, size=16))
    res = run_minfm(command, str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'run'))}",
                    "--set", "train.fid_every=2", "--set", f"train.fid_ref={json.dumps(ref)}",
                    env={"MINFM_DISABLE_PLUGINS": "eval"})
    assert res.returncode == 2, res.stderr
    assert "train.fid_every: no plugin registers the image metric 'fid' that the in-training FID uses" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


class _Mydata:
    @hookimpl
    def register_commands(self, subparsers):
        p = command_group(subparsers, "data", help="prepare datasets").add_parser("mydata", help="a third party's dataset")
        p.set_defaults(func=lambda args: 7)


def test_plugins_share_a_command_group(capsys):
    """A third party's dataset command sits next to the imagenet plugin's under `minfm data`."""
    with plugin(_Mydata(), "mydata"):
        assert main(["data", "mydata"]) == 7
        with pytest.raises(SystemExit):
            main(["data", "--help"])
    listed = capsys.readouterr().out
    assert "mydata" in listed and "imagenet" in listed


def test_a_group_cannot_take_over_a_command():
    sub = argparse.ArgumentParser().add_subparsers()
    sub.add_parser("plain")
    assert command_group(sub, "g") is command_group(sub, "g")
    with pytest.raises(PluginError, match="'minfm plain' is a command, not a command group"):
        command_group(sub, "plain")

