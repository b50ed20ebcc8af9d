"""Hub safety: pickles refused, ids validated, one-line errors (exit 2), the token never leaks."""

from __future__ import annotations

import time

import pytest
from hub_helpers import TOKEN, env_for, hub_cli, hub_python, make_model_folder, one_error_line
from hubserver import HubServer

from minfm_core.errors import MinfmError

pytest_plugins = ["hub_fixtures"]  # the hub_server fixture (harmless once conftest loads it too)


def test_pickle_files_are_refused_on_push(hub_server, tmp_path):
    src = make_model_folder(tmp_path / "src", extras=False)
    (src / "optimizer.pt").write_bytes(b"\x80\x04not really")
    line = one_error_line(hub_cli(env_for(hub_server, tmp_path), "hub", "push", str(src), "org/p"))
    assert "optimizer.pt" in line and "pickle" in line
    assert not hub_server.has_repo("org/p")  # refused before anything was sent


def test_a_repo_holding_a_pickle_is_refused_on_pull(hub_server, tmp_path):
    hub_server.upload("org/evil", {"model.safetensors": b"x", "pytorch_model.bin": b"\x80\x04"})
    env = env_for(hub_server, tmp_path)
    line = one_error_line(hub_cli(env, "hub", "pull", "org/evil", "--local-dir", str(tmp_path / "out")))
    assert "pytorch_model.bin" in line and "pickle" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()
    proc = hub_python(env, "from minfm_core.sources import resolve_source\nresolve_source('hf://org/evil')")
    assert proc.returncode == 1 and "MinfmError" in proc.stderr and "pickle" in proc.stderr


@pytest.mark.parametrize("args, expect", [
    (("hub", "pull", "not-a-repo"), "invalid Hub repo id 'not-a-repo'"),
    (("hub", "pull", "org/a/b"), "invalid Hub repo id"),
    (("hub", "pull", "org/name@bad rev"), "invalid Hub revision 'bad rev'"),
    (("hub", "push", ".", "org--x"), "invalid Hub repo id"),
    # the card's metadata published it as typed: empty, or a newline and HTML after it
    (("hub", "push", ".", "org/there", "--license", ""), "--license: empty value"),
    (("hub", "push", ".", "org/there", "--license", "mit\n<script>"), "--license 'mit\\n<script>': expected a license id"),
    (("hub", "pull", "org/absent"), "Hub repo org/absent not found"),
    (("hub", "pull", "org/there@nope"), "org/there@nope: no such revision"),
    (("hub", "push", "does/not/exist", "org/there"), "does/not/exist: no such file or directory"),
    # checked before any export or request (0 staged one shard per tensor)
    (("hub", "push", ".", "org/there", "--max-shard-size", "0"), "--max-shard-size 0: expected from 1KB to 50GB"),
    (("hub", "push", ".", "org/there", "--max-shard-size", "100GB"), "--max-shard-size 100GB: expected from 1KB"),
    (("hub", "push", ".", "org/there", "--max-shard-size", "5XB"), "--max-shard-size: invalid size '5XB'"),
    (("hub", "pull", "org/there", "--max-bytes", "-5GB"), "invalid size '-5GB': expected e.g. 5GB, 500MB or a number "
                                                          "of bytes (MINFM_HUB_MAX_BYTES / --max-bytes)"),
    # float() made infinity of it (an OverflowError traceback); past 1 PiB is a typo, not a disk
    (("hub", "pull", "org/there", "--max-bytes", "9" * 30 + "TB"), "(MINFM_HUB_MAX_BYTES / --max-bytes): expected 1 byte "
                                                                   "to 1PiB"),
    (("hub", "pull", "org/there", "--max-bytes", "9" * 400), "invalid size '" + "9" * 30),
    (("hub", "pull", "org/there", "--max-bytes", "\uff15GB"), "invalid size '\uff15GB': expected e.g. 5GB"),
])
def test_bad_input_is_one_line_and_exit_2(hub_server, tmp_path, args, expect):
    hub_server.upload("org/there", {"model.safetensors": b"x"})
    line = one_error_line(hub_cli(env_for(hub_server, tmp_path), *args))
    assert expect in line


def test_push_of_a_folder_without_weights_says_what_is_missing(hub_server, tmp_path):
    (tmp_path / "run").mkdir()
    line = one_error_line(hub_cli(env_for(hub_server, tmp_path), "hub", "push", str(tmp_path / "run"), "org/x"))
    assert "no complete checkpoint found" in line and str(tmp_path / "run") in line
    assert hub_server.has_repo("org/x") is False  # nothing was created


def test_server_down_is_one_line_and_fast(tmp_path):
    with HubServer() as server:
        env = env_for(server, tmp_path)
    src = make_model_folder(tmp_path / "src", extras=False)
    for args in (("hub", "pull", "org/m"), ("hub", "push", str(src), "org/m")):
        t0 = time.monotonic()
        line = one_error_line(hub_cli(env, *args))
        assert "cannot reach the Hub at http://127.0.0.1:" in line, line
        assert time.monotonic() - t0 < 20


def test_the_token_never_appears_in_output_or_repo(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    env["HF_DEBUG"] = "1"  # even with the client's debug logging on
    src = make_model_folder(tmp_path / "src")
    runs = [
        hub_cli(env, "hub", "push", str(src), "org/tok", "--private"),
        hub_cli(env, "hub", "push", str(src), "org/tok"),
        hub_cli(env, "hub", "pull", "org/tok", "--local-dir", str(tmp_path / "out")),
        hub_cli(env, "hub", "pull", "org/missing"),
        hub_cli(env, "hub", "pull", "org/tok@nope"),
    ]
    assert [p.returncode for p in runs] == [0, 0, 0, 2, 2]
    for p in runs:
        assert TOKEN not in p.stdout and TOKEN not in p.stderr
    for data in hub_server.files("org/tok").values():
        assert TOKEN.encode() not in data
    for f in (tmp_path / "out").rglob("*"):
        assert not f.is_file() or TOKEN.encode() not in f.read_bytes()
    assert hub_server.state.repos[("model", "org/tok")].private


def test_translate_keeps_messages_to_one_line_and_masks_the_token(monkeypatch):
    from minfm_hub.errors import scrub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert scrub(f"bad header Authorization: Bearer {TOKEN}") == "bad header Authorization: Bearer ***"
    assert issubclass(__import__("minfm_hub.errors", fromlist=["HubError"]).HubError, MinfmError)


def test_a_failed_push_leaves_the_repo_as_it_was(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    assert hub_cli(env, "hub", "push", str(make_model_folder(tmp_path / "a", seed=1)), "org/f").returncode == 0
    before = hub_server.files("org/f")
    hub_server.fail_next_commits(10)
    line = one_error_line(hub_cli(env, "hub", "push", str(make_model_folder(tmp_path / "b", seed=2)), "org/f"))
    assert "HTTP 500" in line
    assert hub_server.files("org/f") == before and len(hub_server.commits("org/f")) == 2


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    """write_atomic: the writer raising half-way (a full disk) leaves the old bytes and no temp file."""
    from minfm_core.safepath import write_atomic

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def half(tmp):
        tmp.write_bytes(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, half)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_atomic_write_has_the_permissions_the_umask_gives(tmp_path, umask):
    """mkstemp's 0600 made exported models, manifests and latent caches unreadable to the
    user's group whatever the umask; a file written in place would have had 0666 & ~umask."""
    import os
    import stat

    import torch

    from minfm_core.safepath import write_bytes_atomic
    from minfm_core.weights import save_safetensors_file

    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "new.json", b"{}")
        (tmp_path / "old.json").write_bytes(b"[]")
        os.chmod(tmp_path / "old.json", 0o600)
        write_bytes_atomic(tmp_path / "old.json", b"{}")
        # safetensors' save_file renames a 0600 file of its own over the one it is given
        save_safetensors_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    names = ["model.safetensors", "new.json", "old.json"]
    for name in names:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == names
