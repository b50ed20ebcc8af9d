"""read_bounded reads what a file holds, not its limit: ``f.read(max_bytes + 1)`` reserved the
whole limit first, so resuming a run (metrics.jsonl, a 16 GiB limit) under an address-space
limit said "out of memory" for a file of a few KB."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from minfm_core.errors import MinfmError
from minfm_core.textfiles import read_bounded


def test_a_small_file_under_a_huge_limit_reads_within_an_address_space_limit(tmp_path):
    (tmp_path / "small.txt").write_bytes(b"x" * 2000)
    code = textwrap.dedent(f"""
        import resource
        from minfm_core.textfiles import read_bounded
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        assert read_bounded({str(tmp_path / "small.txt")!r}, "small.txt", 16 << 30) == b"x" * 2000
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("size", [0, 1, 8 << 20, (8 << 20) + 3, 20 << 20])
def test_every_byte_is_read_across_chunks_and_the_limit_holds(tmp_path, size):
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    (tmp_path / "f").write_bytes(data)
    assert read_bounded(tmp_path / "f", "f", 20 << 20) == data
    if size:
        with pytest.raises(MinfmError, match="more than the"):
            read_bounded(tmp_path / "f", "f", size - 1)
