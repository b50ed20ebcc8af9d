"""What a hostile or changing Hub answers is checked before the client uses it.

huggingface_hub names cache files after the server's answers (``blobs/<ETag>``,
``snapshots/<commit>``): a pull refuses any that is no hash, in one line, and leaves nothing
behind. A branch that moves during a pull does not change what arrives. The server is the
test Hub with a hostile handler (below); the real client runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hub_helpers import ROOT, env_for, main_in_process, make_model_folder, one_error_line, only_hub_plugin
from minfm_core.errors import MinfmError
from hubserver import HubServer, HubState, _Handler


class _LaxState(HubState):
    """Answers a revision it does not know with main's tree: a server may say anything."""

    def tree(self, repo, rev):
        return super().tree(repo, rev if repo.resolve(rev) else "main")


class _HostileHandler(_Handler):
    def _dispatch(self, method):
        hub = self.server.hub
        if hub.on_request is not None and hub.on_request(self, method, urlsplit(self.path).path):
            return  # answered by the test
        super()._dispatch(method)

    def _send(self, status, body=b"", headers=None, *args, **kwargs):
        headers = dict(headers or {})
        if "/resolve/" in self.path and self.path.endswith(self.server.hub.tamper_file):
            headers.update(self.server.hub.file_headers)
        super()._send(status, body, headers, *args, **kwargs)

    def _json(self, obj, *args, **kwargs):
        if "/tree/" in self.path and isinstance(obj, list):
            obj = obj + [{"type": "file", "oid": "0" * 40, "size": 2, "path": n} for n in self.server.hub.tree_extra]
        super()._json(obj, *args, **kwargs)

    def _info(self, repo, sha, files):
        info = super()._info(repo, sha, files)
        return {**info, "sha": self.server.hub.sha} if self.server.hub.sha is not None else info


class HostileHub(HubServer):
    """The test Hub; set these to make it lie."""

    handler = _HostileHandler

    def __init__(self):
        super().__init__()
        self.state = _LaxState()
        self.file_headers: dict[str, str] = {}  # sent with the answers for ``tamper_file``
        self.tamper_file = "model.safetensors"
        self.sha = None  # the commit every repo info names
        self.tree_extra: list[str] = []  # file names added to every tree listing
        self.on_request = None  # (handler, method, path) -> True when it answered itself


@pytest.fixture
def hostile():
    with HostileHub() as hub:
        yield hub


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("header, value", [
    ("ETag", '"../../../../outside"'),  # relative to the repo's blobs/: tmp_path/outside
    ("X-Linked-Etag", "../../../../outside"),
    ("X-Repo-Commit", "../../../../outside"),
])
def test_a_file_answer_that_is_no_hash_is_refused_before_the_client_uses_it(hostile, tmp_path, header, value):
    hostile.upload("org/m", {"model.safetensors": b"weights", "recipe.toml": b"a = 1\n"})
    hostile.file_headers = {header: value}
    env = env_for(hostile, tmp_path)
    cache, local = main_in_process(env, ["hub", "pull", "org/m"],
                                   ["hub", "pull", "org/m", "--local-dir", str(tmp_path / "ld")])
    for proc in (cache, local):
        line = one_error_line(proc)
        assert f"with {header} {value!r}, which is not a hash; refusing it" in line, line
    # nothing written outside the cache, no --local-dir or temp folder, nothing of the failed pulls
    # in the cache but the client's lock files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    assert not [p for p in _files_under(tmp_path) if "outside" in p]
    assert not [p for p in _files_under(tmp_path / "home" / "hub") if not p.startswith((".locks", "CACHEDIR.TAG"))]


def test_a_repo_info_commit_that_is_no_sha_is_refused(hostile, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine\n")
    hostile.upload("org/m", {"model.safetensors": b"x", "recipe.toml": b""})
    hostile.sha = "../../../../victim"  # from the repo's snapshots/ (or trees/): tmp_path/victim
    env = env_for(hostile, tmp_path)
    for proc in main_in_process(env, ["hub", "pull", "org/m"],
                                ["hub", "pull", "org/m", "--local-dir", str(tmp_path / "ld")]):
        line = one_error_line(proc)
        assert "with commit '../../../../victim', which is not a hash; refusing it" in line, line
    assert sorted(os.listdir(victim)) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "victim"]
    assert not (tmp_path / "home" / "hub" / "models--org--m").exists()


def test_a_listing_that_differs_from_the_checked_one_is_refused(hostile, tmp_path):
    """The client downloads from its own tree listing: its names are checked too."""
    hostile.upload("org/m", {"model.safetensors": b"x"})
    hostile.tree_extra = ["../escape.json"]
    (proc,) = main_in_process(env_for(hostile, tmp_path), ["hub", "pull", "org/m"])
    assert "Hub repo org/m: refusing file name '../escape.json': it leaves the repo folder" in one_error_line(proc)
    assert not (tmp_path / "home" / "hub" / "models--org--m").exists()
    assert not [p for p in _files_under(tmp_path) if "escape" in p]


def test_a_branch_moving_during_the_pull_does_not_change_what_arrives(hostile, tmp_path):
    """The commit checked is the commit downloaded and recorded, whatever the branch says later."""
    env = env_for(hostile, tmp_path)
    for n, args in enumerate((["--local-dir", str(tmp_path / "ld")], [])):
        checked = hostile.upload("org/m", {"model.safetensors": b"OLD%d" % n, "recipe.toml": b"a = 1\n"},
                                 delete=("extra.json",))
        seen = []

        def push_meanwhile(handler, method, path, seen=seen):
            if method == "GET" and path.startswith("/api/models/org/m"):
                seen.append(path)
                if len(seen) == 2:  # minFM checked the listing; the owner pushes before the next answer
                    hostile.upload("org/m", {"model.safetensors": b"NEW", "extra.json": b"{}"})
            return False

        hostile.on_request = push_meanwhile
        (proc,) = main_in_process(env, ["hub", "pull", "org/m", *args])
        hostile.on_request = None
        assert proc.returncode == 0, proc.stderr
        assert len(seen) >= 2 and hostile.head("org/m") != checked  # the branch did move
        folder = Path(proc.stdout.strip())
        assert json.loads((folder / "minfm_source.json").read_text())["commit"] == checked
        assert (folder / "model.safetensors").read_bytes() == b"OLD%d" % n
        assert not (folder / "extra.json").exists()
    # the cache records the branch for offline use, at the commit that was downloaded
    assert folder.name == checked and (folder.parent.parent / "refs" / "main").read_text() == checked


@pytest.mark.slow
def test_a_failing_pull_does_not_remove_what_a_concurrent_pull_brought(hostile, tmp_path):
    """Pull A (with the training state) fails slowly; pull B of the same repo runs meanwhile.
    B's snapshot must survive A's clean-up (the two are serialized per repo)."""
    make_model_folder(tmp_path / "m")
    files = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    hostile.upload("org/m", {**files, "checkpoint/manifest.json": b"{}"})
    started = []

    def slow_fail(handler, method, path):
        if method == "GET" and path.endswith("checkpoint/manifest.json"):
            started.append(path)
            time.sleep(8)
            handler._send(403, b'{"error": "no"}')  # not retried by the client: a quick failure
            return True
        return False

    hostile.on_request = slow_fail
    env = {**env_for(hostile, tmp_path), "MINFM_DISABLE_PLUGINS": only_hub_plugin(),
           "HF_HUB_DOWNLOAD_TIMEOUT": "30", "HF_HUB_ETAG_TIMEOUT": "30"}
    cmd = [sys.executable, "-m", "minfm_core.cli.main", "hub", "pull", "org/m"]
    a = subprocess.Popen([*cmd, "--include-training-state"], env=env, cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not started and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started, "pull A never reached the training state"
        b = subprocess.run(cmd, env=env, cwd=ROOT, text=True, capture_output=True, timeout=120)
        _, a_err = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 2 and "HTTP 403" in a_err, a_err
    assert b.returncode == 0, b.stderr
    snap = Path(b.stdout.strip())
    assert {"model.safetensors", "ema.safetensors", "recipe.toml"} <= set(os.listdir(snap))
    assert (snap / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (snap / "checkpoint").exists()  # A's partial training state is gone
    (offline,) = main_in_process({**env, "HF_HUB_OFFLINE": "1"}, ["hub", "pull", "org/m"])
    assert offline.returncode == 0 and offline.stdout.strip() == str(snap), offline.stderr


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_file_body_larger_than_listed_is_cut_off_on_the_wire(hostile, tmp_path, declared):
    """The listing (and HEAD) say 7 bytes; the GET streams 48 MiB. The client writes a whole
    body before it compares sizes, so a server could fill the disk under any --max-bytes:
    the pull now stops once the bodies pass what the listing said, and keeps nothing."""
    hostile.upload("org/m", {"model.safetensors": b"weights", "recipe.toml": b"a = 1\n"})
    mib = 1 << 20

    def flood(handler, method, path):
        if method != "GET" or not path.endswith("/model.safetensors"):
            return False
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        if declared:
            handler.send_header("Content-Length", str(48 * mib))
        else:  # no length: the body ends when the server closes the connection
            handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        try:
            for _ in range(48):
                handler.wfile.write(b"\0" * mib)
        except OSError:  # the client hung up: what the test wants
            pass
        return True

    hostile.on_request = flood
    env = env_for(hostile, tmp_path)
    cache, local = main_in_process(env, ["hub", "pull", "org/m"],
                                   ["hub", "pull", "org/m", "--local-dir", str(tmp_path / "ld")])
    total = sum(len(b) for b in (b"weights", b"a = 1\n"))
    for proc in (cache, local):
        line = one_error_line(proc)
        assert line.endswith(f"sent more than the {total} bytes it listed; refusing it"), line
    assert not (tmp_path / "ld").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    # at most a few chunks were read, and nothing of them kept
    assert sum(p.stat().st_size for p in (tmp_path / "home").rglob("*") if p.is_file()) < mib
    assert not [p for p in _files_under(tmp_path / "home" / "hub") if not p.startswith((".locks", "CACHEDIR.TAG"))]


def test_an_api_answer_is_read_only_up_to_its_bound(hostile, monkeypatch):
    """A repo info is JSON read whole into memory (by the client, and by the check): a server
    could answer gigabytes. Read through the same hook the client's session carries, with the
    bound lowered to fit a test."""
    import httpx2

    from minfm_hub import answers

    hostile.upload("org/m", {"model.safetensors": b"weights"})
    url = f"{hostile.endpoint}/api/models/org/m"
    with httpx2.Client(event_hooks={"response": [answers._check_answer]}) as client, answers.checked_answers():
        assert client.get(url).json()["id"] == "org/m"  # the answer fits the bound
        monkeypatch.setattr(answers, "MAX_API_BYTES", 100)
        with pytest.raises(MinfmError, match=r"Hub answer '/api/models/org/m': the Hub at http://127.0.0.1:\d+ sent more "
                                             r"than the 100 bytes an answer may hold; refusing it"):
            client.get(url)


def test_a_pull_fetches_over_http_even_when_the_answer_offers_xet(hostile, tmp_path):
    """A resolve answer naming a Xet hash made the client stream the file with hf_xet from a
    storage server the answer names, outside the byte count. minFM's Hub calls turn Xet off:
    the file comes over HTTP, counted, and the storage route is never asked."""
    make_model_folder(tmp_path / "m")
    files = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    hostile.upload("org/m", files)
    hostile.tamper_file = ""  # every resolve answer
    hostile.file_headers = {"X-Xet-Hash": "a" * 64, "X-Xet-Refresh-Route": f"{hostile.endpoint}/api/xet-token"}
    env = {**env_for(hostile, tmp_path), "HF_HUB_DISABLE_XET": "0"}  # the tests' default is 1
    (cache,) = main_in_process(env, ["hub", "pull", "org/m"])
    assert cache.returncode == 0, cache.stderr
    snap = Path(cache.stdout.strip().splitlines()[-1])
    assert {n: (snap / n).read_bytes() for n in files} == files
    assert not [p for _, p in hostile.requests if "xet" in p]


def test_a_compressed_body_is_refused_and_never_unpacked(hostile, tmp_path):
    """Bodies are counted as they arrive: 48 MiB of zeros gzip to 48 KiB, inside any count, and
    the client would unpack them. A pull asks for bodies uncompressed and refuses one that is not."""
    import gzip

    # listed at 64 KiB: the bomb's 48 KiB fit the count of the bytes that arrive
    hostile.upload("org/m", {"model.safetensors": bytes(range(256)) * 256, "recipe.toml": b"a = 1\n"})
    bomb = gzip.compress(b"\0" * (48 << 20))
    assert len(bomb) < 64 << 10
    asked = []

    def gzipped(handler, method, path):
        if method != "GET" or not path.endswith("/model.safetensors"):
            return False
        asked.append(handler.headers.get("Accept-Encoding"))
        handler._send(200, bomb, {"Content-Encoding": "gzip"}, "application/octet-stream")
        return True

    hostile.on_request = gzipped
    (cache,) = main_in_process(env_for(hostile, tmp_path), ["hub", "pull", "org/m"])
    line = one_error_line(cache)
    assert line.endswith("sent a 'gzip'-compressed body, asked for it uncompressed; refusing it "
                         "(its unpacked size is not bounded)"), line
    assert asked and set(asked) == {"identity"}
    assert sum(p.stat().st_size for p in (tmp_path / "home").rglob("*") if p.is_file()) < 1 << 20
