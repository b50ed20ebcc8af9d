"""Path and name flags: an empty value is refused, not taken as "not given"; a file where a
folder is to be written is refused by the flag's name before any work, and left as it was."""

from __future__ import annotations

import json

import pytest
from engine_helpers import TINY

from minfm_core.cli.main import main


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("minfm: error: "), err
    return err[-1].removeprefix("minfm: error: ")


@pytest.mark.parametrize("argv, flag", [
    (["sample", "run", "--prompt", "x", "--out", ""], "--out"),
    (["cache", "latents", str(TINY), "--out", ""], "--out"),
    (["cache", "latents", str(TINY), "--split", ""], "--split"),
    (["hub", "push", "run", "org/name", "--revision", ""], "--revision"),
    # each was taken: '' sampled the current folder, evaluated without writing, downloaded
    # Inception, served every name ('' allowed-host) or said "--host  --port: not known"
    (["sample", "", "--prompt", "x"], "SRC"),
    (["serve", ""], "EXP_DIR"),
    (["serve", "run", "--host", ""], "--host"),
    (["serve", "run", "--allowed-host", ""], "--allowed-host"),
    (["demo", "run", "--allowed-host", ""], "--allowed-host"),
    (["demo", "", "--host", "127.0.0.1"], "SRC"),
    (["eval", "imagenet", "s.npz", "--ref", "r.npz", "--out", ""], "--out"),
    (["eval", "folder", "s", "--ref", "r.npz", "--inception", ""], "--inception"),
    (["hub", "push", "", "org/name"], "SRC"),
    (["data", "imagenet", "prepare", "", "--recipe", str(TINY), "--out", "o"], "ROOT"),
])
def test_an_empty_value_is_refused(argv, flag, capsys):
    """`--out ''` sampled into the default folder and `--revision ''` pushed to main, exit 0."""
    assert main(argv) == 2
    assert _error(capsys) == f"{flag}: empty value"


@pytest.mark.parametrize("argv, flag", [
    (["cache", "latents", str(TINY), "--out", "{file}"], "--out"),
    (["export", "diffusers", "run", "{file}"], "OUT_DIR"),
    (["data", "imagenet", "prepare", "{root}", "--recipe", str(TINY), "--out", "{file}"], "--out"),
    (["hub", "pull", "org/name", "--local-dir", "{file}"], "--local-dir"),  # (no Hub here: found before any request)
])
def test_a_file_where_a_folder_goes_is_refused_by_the_flags_name(tmp_path, capsys, argv, flag):
    """They ended in the OS's word for it (`/etc/passwd/train: Not a directory`, `File exists`),
    naming no flag, some after the VAE was built."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert main([a.format(file=file, root=tmp_path) for a in argv]) == 2
    assert _error(capsys) == f"{flag}: {file} is a file, not a folder"
    assert file.read_text() == "mine"


@pytest.mark.parametrize("argv, flag", [
    (["cache", "latents", str(TINY), "--out", "{out}"], "--out"),
    (["export", "diffusers", "run", "{out}"], "OUT_DIR"),
    (["data", "imagenet", "prepare", "{root}", "--recipe", str(TINY), "--out", "{out}"], "--out"),
    (["hub", "pull", "org/name", "--local-dir", "{out}"], "--local-dir"),
    (["run", str(TINY), "--set", "run.exp_dir={out_q}"], f"{TINY}: run.exp_dir"),  # (said by minfm check too)
])
def test_a_folder_below_a_file_is_refused_by_the_flags_name(tmp_path, capsys, argv, flag):
    """`--out notes.txt/sub` failed as `notes.txt/sub/train: Not a directory` after the VAE or
    the model was built, naming no flag."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    out = file / "sub" / "deeper"
    assert main([a.format(out=out, out_q=json.dumps(str(out)), root=tmp_path) for a in argv]) == 2
    blame = " (from --set run.exp_dir)" if flag.endswith("run.exp_dir") else ""
    assert _error(capsys) == f"{flag}: {out} cannot be made: {file} is not a folder{blame}"
    assert file.read_text() == "mine"


def test_a_split_given_twice_is_refused(capsys):
    """It was encoded twice over."""
    assert main(["cache", "latents", str(TINY), "--split", "val", "--split", "train", "--split", "val"]) == 2
    assert _error(capsys) == "--split val: given more than once"


def test_every_split_is_found_before_any_is_encoded(tmp_path, capsys):
    """`--split train --split bogus` encoded and wrote all of train, then refused bogus."""
    out = tmp_path / "lat"
    assert main(["cache", "latents", str(TINY), "--limit", "2", "--out", str(out), "--split", "train",
                 "--split", "bogus"]) == 2
    assert _error(capsys) == "--split bogus: data: shapes: unknown split 'bogus'; expected 'train' or 'val'"
    assert not out.exists()


def test_a_prompt_flag_is_held_to_the_prompt_rules(capsys):
    """A prompt file's line and a recipe's prompt are refused past 65,536 characters; --prompt was not."""
    assert main(["sample", "run", "--prompt", "z" * 70_000]) == 2
    assert _error(capsys) == "--prompt: 70,000 characters, more than 65,536"


@pytest.mark.parametrize("name", ["a b", "proxy/path", "x\ty"])
def test_an_allowed_host_that_is_no_host_name_is_refused(name, capsys):
    assert main(["serve", "run", "--allowed-host", name]) == 2
    assert _error(capsys) == f"--allowed-host: {name!r} is not a host name (e.g. myproxy.internal)"
