"""Pulling again into an existing ``--local-dir``: the folder ends up as the new commit or as it
was, never a mix. The real client drives the local test Hub in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hub_helpers import ROOT, env_for, main_in_process, one_error_line, only_hub_plugin

pytest_plugins = ["hub_fixtures"]


def listing(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a file's bytes and inode (replaced, not rewritten), else "dir"."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), os.lstat(p).st_ino) if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_a_repull_removes_the_previous_pulls_files_the_new_commit_lacks(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    ld = tmp_path / "ld"
    hub_server.upload("org/m", {"model.safetensors": b"v1", "ema.safetensors": b"ema1", "ckpt/a.json": b"{}",
                                "recipe.toml": b"a = 1\n"})
    (v1,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(ld)])
    assert v1.returncode == 0, v1.stderr
    assert json.loads((ld / "minfm_source.json").read_text())["files"] == [
        "ckpt/a.json", "ema.safetensors", "model.safetensors", "recipe.toml"]
    (ld / "mine.safetensors").write_bytes(b"the user's own")  # no pull brought it: it stays
    # v2: retrained without EMA, its ckpt/ folder gone
    v2_sha = hub_server.upload("org/m", {"model.safetensors": b"v2"}, delete=("ema.safetensors", "ckpt/a.json"))
    (v2,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(ld)])
    assert v2.returncode == 0, v2.stderr
    assert sorted(p.name for p in ld.iterdir()) == [".cache", "mine.safetensors", "minfm_source.json",
                                                    "model.safetensors", "recipe.toml"]
    assert (ld / "model.safetensors").read_bytes() == b"v2"
    record = json.loads((ld / "minfm_source.json").read_text())
    assert record["commit"] == v2_sha and record["files"] == ["model.safetensors", "recipe.toml"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ld")] == []


def test_a_failed_move_leaves_the_local_dir_as_it_was_and_names_the_file(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    ld = tmp_path / "ld"
    names = ("README.md", "ema.safetensors", "metrics.jsonl", "model.safetensors", "recipe.toml", "samples.png")
    hub_server.upload("org/m", {n: b"v1 " + n.encode() for n in names})
    (v1,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(ld)])
    assert v1.returncode == 0, v1.stderr
    hub_server.upload("org/m", {n: b"v2 " + n.encode() for n in names} | {"new/extra.json": b"{}"})
    # Something in the target blocks one destination half-way through the moves (here an empty
    # folder where recipe.toml goes; for a user other than root a read-only subfolder does the same).
    (ld / "recipe.toml").unlink()
    (ld / "recipe.toml").mkdir()
    before = listing(ld)
    (v2,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(ld)])
    line = one_error_line(v2)
    assert f"{ld}: cannot update recipe.toml (Is a directory); the folder was left as it was" in line, line
    assert listing(ld) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ld")] == []  # no temp or aside folder


def test_an_empty_local_dir_is_refused(hub_server, tmp_path):
    """``Path("")`` is the current folder: an empty DIR (an unset shell variable) must not pull there."""
    hub_server.upload("org/m", {"model.safetensors": b"x", "a.json": b"{}"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**env_for(hub_server, tmp_path), "MINFM_DISABLE_PLUGINS": only_hub_plugin(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "minfm_core.cli.main", "hub", "pull", "org/m", "--local-dir", ""],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    assert one_error_line(proc) == "minfm: error: --local-dir: empty value"
    assert list(cwd.iterdir()) == []


def test_a_file_or_a_dangling_link_as_local_dir_is_refused_and_kept(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    hub_server.upload("org/m", {"model.safetensors": b"x"})
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    (res,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(f)])
    assert one_error_line(res) == f"minfm: error: --local-dir: {f} is a file, not a folder"
    assert f.read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")  # pulled through, the link's target would be made: it is the user's
    (res,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(link)])
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "gone" / "model.safetensors").read_bytes() == b"x"


def test_a_failed_pull_leaves_no_folder_it_made_on_the_way(hub_server, tmp_path):
    """`--local-dir a/b/c` made a/b before the download, and a failed pull left them there."""
    env = {**env_for(hub_server, tmp_path), "HF_HUB_OFFLINE": "1"}  # the repo is in no cache: it fails
    (res,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(tmp_path / "a" / "b" / "c")])
    assert res.returncode == 2 and "HF_HUB_OFFLINE is set" in res.stderr, res.stderr
    assert not (tmp_path / "a").exists()
