"""Revisions and repo file names are refused before any request when git or a file system
could not take them, in one line that shows them escaped."""

from __future__ import annotations

import pytest
from hub_helpers import env_for, main_in_process, one_error_line

from minfm_core.errors import MinfmError
from minfm_hub.answers import check_names
from minfm_hub.uri import parse_ref

pytest_plugins = ["hub_fixtures"]

MAX_NAME_DEPTH, MAX_NAME_BYTES = 32, 1024  # the bounds docs/security.md states


@pytest.mark.parametrize("revision", [
    "a\x1bb", "x\x00y", "\x1b]0;t\x07", "del\x7f", "tab\there", "\u202emain", "zero\u200bwidth",
    "a/.hidden", "a.lock/b", "@", "v1.lock",
])
def test_revisions_git_refuses_are_refused_and_shown_escaped(revision):
    with pytest.raises(MinfmError) as err:
        parse_ref(f"org/m@{revision}")
    msg = str(err.value)
    assert msg.startswith(f"invalid Hub revision {revision!r}") and msg.isprintable(), msg


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/3", "exp/dev-2", "a" * 40, "r\u00e9v"])
def test_ordinary_revisions_pass(revision):
    assert parse_ref(f"org/m@{revision}").revision == revision


def test_a_long_bad_revision_is_cut_in_the_message():
    with pytest.raises(MinfmError) as err:
        parse_ref("org/m@" + "\x1b" * 5000)
    assert len(str(err.value)) < 400


def test_a_control_character_revision_never_reaches_the_terminal(hub_server, tmp_path):
    hub_server.upload("org/m", {"model.safetensors": b"x"})
    n_before = len(hub_server.requests)
    (proc,) = main_in_process(env_for(hub_server, tmp_path), ["hub", "pull", "org/m@main\x1b]0;EVIL\x07"])
    assert one_error_line(proc).startswith("minfm: error: invalid Hub revision 'main\\x1b]0;EVIL\\x07'")
    assert "\x1b" not in proc.stderr + proc.stdout
    assert hub_server.requests[n_before:] == []


def test_names_are_bounded_in_depth_and_length():
    check_names(["/".join(["d"] * MAX_NAME_DEPTH)], "Hub repo org/x")  # at the limits: fine
    check_names(["/".join(["d" * 100] * 10)[:MAX_NAME_BYTES]], "Hub repo org/x")
    for name in ("/".join(["a"] * (MAX_NAME_DEPTH + 1)), "/".join(["d" * 200] * 6)):
        with pytest.raises(MinfmError, match=f"more than {MAX_NAME_DEPTH} path segments or {MAX_NAME_BYTES} bytes"):
            check_names([name], "Hub repo org/x")


def test_a_repo_with_a_very_deep_name_is_one_line(hub_server, tmp_path):
    """2000 path segments sent the client into a RecursionError (a traceback)."""
    deep = "/".join(["a"] * 2000) + "/x.json"
    hub_server.upload("org/deep", {deep: b"{}", "model.safetensors": b"x"})
    cache, local = main_in_process(env_for(hub_server, tmp_path), ["hub", "pull", "org/deep"],
                                   ["hub", "pull", "org/deep", "--local-dir", str(tmp_path / "ld")])
    for proc in (cache, local):
        line = one_error_line(proc)
        assert "Hub repo org/deep: refusing file name 'a/a/a/" in line and "more than 32 path segments" in line
        assert len(line) < 400
    assert not (tmp_path / "ld").exists()
