"""``safepath.file_in_the_way``: the one rule (and wording) for a folder a command will write into."""

from __future__ import annotations

import os

import pytest

from minfm_core.errors import MinfmError
from minfm_core.safepath import file_in_the_way, require_folder_room


def test_each_kind_of_entry(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "to_dir").symlink_to(tmp_path / "dir")
    (tmp_path / "to_file").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    os.mkfifo(tmp_path / "fifo")
    got = {p.name: file_in_the_way(p, "--out") for p in sorted(tmp_path.iterdir())}
    got["absent"] = file_in_the_way(tmp_path / "absent", "--out")
    assert got == {
        "absent": None, "dir": None, "to_dir": None,
        "dangling": f"--out: {tmp_path / 'dangling'} is a link to nothing, not a folder",
        "fifo": f"--out: {tmp_path / 'fifo'} is a file, not a folder",
        "file": f"--out: {tmp_path / 'file'} is a file, not a folder",
        "to_file": f"--out: {tmp_path / 'to_file'} is a file, not a folder",
    }


def test_require_raises_the_same_line(tmp_path):
    (tmp_path / "f").write_text("x")
    require_folder_room(tmp_path / "absent", "run.exp_dir")
    with pytest.raises(MinfmError) as info:
        require_folder_room(tmp_path / "f", "run.exp_dir")
    assert str(info.value) == f"run.exp_dir: {tmp_path / 'f'} is a file, not a folder"
