"""Atomic writes never replace a FIFO or a device (the rename would: `--out /dev/null` run as
root turned /dev/null into a plain file); prompt files split at newlines only."""

from __future__ import annotations

import os
import stat

import pytest

from minfm_core.engine.prompts import read_prompt_file
from minfm_core.errors import MinfmError
from minfm_core.safepath import write_text_atomic


def test_a_fifo_at_the_output_path_is_refused_and_left_as_it_is(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    with pytest.raises(MinfmError, match=r"out.json: is a FIFO, not a file; refusing to replace it"):
        write_text_atomic(fifo, "{}")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary file left either


def test_files_and_symlinks_are_still_replaced(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    write_text_atomic(tmp_path / "a.txt", "new")
    (tmp_path / "target").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    write_text_atomic(tmp_path / "link", "new")
    assert (tmp_path / "a.txt").read_text() == "new" and (tmp_path / "target").read_text() == "keep"
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "link").read_text() == "new"


def test_prompt_lines_end_at_newlines_only(tmp_path):
    """U+2028 or a form feed inside a caption made two prompts of one, shifting later indices."""
    f = tmp_path / "prompts.txt"
    f.write_text("a red\u2028circle\r\nnext\x0cline\n\n  padded  \n", encoding="utf-8")
    assert read_prompt_file(f) == ["a red\u2028circle", "next\x0cline", "padded"]
