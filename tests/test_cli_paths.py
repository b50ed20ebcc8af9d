"""Path and name flags: an empty value is refused, not taken as "not given"; a file where a
folder is to be written is refused by the flag's name before any work, and left as it was."""

from __future__ import annotations

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


def test_a_split_given_twice_is_refused(capsys):
    """It was encoded twice over."""
    assert main(["cache", "latents", str(TINY), "--split", "val", "--split", "train", "--split", "val"]) == 2
    assert _error(capsys) == "--split val: given more than once"
