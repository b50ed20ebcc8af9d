"""Repo file names as the server lists them are untrusted: what minfm_hub.pull lets through stays inside."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from hypothesis import given, settings
from hypothesis import strategies as st

from minfm_core.errors import MinfmError
from minfm_core.safepath import contained
from minfm_hub.answers import check_names

_PARTS = st.sampled_from(["..", ".", "", "a", "model.safetensors", "C:", "~", "\\", "\n", "\u202e", "é", "x" * 210])
_NAMES = st.lists(st.one_of(_PARTS, st.text(max_size=12)), min_size=1, max_size=5).map("/".join)


@settings(max_examples=300, deadline=None)
@given(names=st.lists(_NAMES, min_size=1, max_size=4))
def test_names_that_pass_stay_inside_any_folder(names):
    root = Path("/nonexistent/minfm-root")
    try:
        check_names(names, "Hub repo org/x")
    except MinfmError as exc:
        assert "\n" not in str(exc) and "refusing file name" in str(exc)
        return
    for name in names:
        pure = PurePosixPath(name)
        assert not pure.is_absolute() and ".." not in pure.parts and not name.startswith(".cache/")
        assert name.isprintable()
        contained(root, name, what="test")  # raises if it would leave root
    files = set(names)
    for name in names:  # no name is both a file and a folder
        assert not any(str(p) in files for p in PurePosixPath(name).parents if str(p) != ".")
