"""The test Hub (tests/hubserver.py) speaks the protocol of the real huggingface_hub client.

Each test runs a short script with the real client in a subprocess (the client reads
HF_ENDPOINT at import) and checks the server's state afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request

from hubserver import git_blob_sha1

pytest_plugins = ["hub_fixtures"]  # the hub_server fixture (harmless once conftest loads it too)


def run_client(env: dict, code: str) -> dict:
    """Run ``code`` (which sets ``out``) with huggingface_hub; return ``out`` decoded from JSON."""
    script = "import json\nfrom huggingface_hub import HfApi\napi = HfApi()\nout = {}\n"
    script += textwrap.dedent(code) + "\nprint('@@' + json.dumps(out))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])


def test_create_upload_list_download(hub_server, tmp_path):
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(b'{"a": 1}')
    (folder / "sub" / "w.bin.txt").write_bytes(bytes(range(256)) * 10)
    env = hub_server.env(tmp_path / "home")
    out = run_client(env, f"""
        url = api.create_repo("org/m")
        out["url"] = str(url)
        info = api.upload_folder(repo_id="org/m", folder_path={str(folder)!r}, commit_message="first")
        out["oid"] = info.oid
        out["files"] = sorted(api.list_repo_files("org/m"))
        out["tree"] = sorted((e.path, type(e).__name__) for e in api.list_repo_tree("org/m"))
        out["info_sha"] = api.model_info("org/m").sha
        from huggingface_hub import hf_hub_download
        p = hf_hub_download("org/m", "sub/w.bin.txt")
        out["content_ok"] = open(p, "rb").read() == bytes(range(256)) * 10
        out["paths_info"] = [e.path for e in api.get_paths_info("org/m", ["config.json", "sub", "nope"])]
        try:
            hf_hub_download("org/m", "missing.json")
        except Exception as e:
            out["missing"] = type(e).__name__
        try:
            api.model_info("org/absent")
        except Exception as e:
            out["absent"] = type(e).__name__
        try:
            hf_hub_download("org/m", "config.json", revision="nobranch")
        except Exception as e:
            out["badrev"] = type(e).__name__
    """)
    assert out["url"] == f"{hub_server.endpoint}/org/m"
    assert out["files"] == ["config.json", "sub/w.bin.txt"]
    assert out["tree"] == [["config.json", "RepoFile"], ["sub", "RepoFolder"]]
    assert out["oid"] == out["info_sha"] == hub_server.head("org/m")
    assert out["content_ok"]
    assert out["paths_info"] == ["config.json", "sub"]
    assert out["missing"] == "RemoteEntryNotFoundError"
    assert out["absent"] == "RepositoryNotFoundError"
    assert out["badrev"] == "RevisionNotFoundError"
    assert len(hub_server.commits("org/m")) == 2  # initial + upload
    assert hub_server.files("org/m")["config.json"] == b'{"a": 1}'


def test_snapshot_at_branch_tag_and_commit(hub_server, tmp_path):
    first = hub_server.upload("org/r", {"v.txt": b"one", "keep.txt": b"k"})
    hub_server.tag("org/r", "v1")
    second = hub_server.upload("org/r", {"v.txt": b"two"})
    hub_server.upload("org/r", {"v.txt": b"dev"}, revision="dev")
    env = hub_server.env(tmp_path / "home")
    out = run_client(env, f"""
        from huggingface_hub import snapshot_download
        import pathlib
        def snap(rev, d):
            p = snapshot_download("org/r", revision=rev, local_dir={str(tmp_path)!r} + "/" + d)
            return pathlib.Path(p, "v.txt").read_text()
        out["main"] = snap(None, "a")
        out["tag"] = snap("v1", "b")
        out["commit"] = snap({first!r}, "c")
        out["dev"] = snap("dev", "d")
        out["cached"] = pathlib.Path(snapshot_download("org/r", revision="v1"), "v.txt").read_text()
        refs = api.list_repo_refs("org/r")
        out["branches"] = sorted(b.name for b in refs.branches)
        out["tags"] = [(t.name, t.target_commit) for t in refs.tags]
        out["commits"] = len(api.list_repo_commits("org/r"))
    """)
    assert (out["main"], out["tag"], out["commit"], out["dev"], out["cached"]) == ("two", "one", "one", "dev", "one")
    assert out["branches"] == ["dev", "main"]
    assert out["tags"] == [["v1", first]]
    assert out["commits"] == 3
    assert hub_server.head("org/r") == second


def test_reupload_unchanged_sends_nothing(hub_server, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"alpha")
    (folder / "b.txt").write_bytes(b"beta")
    env = hub_server.env(tmp_path / "home")
    code = f"""
        from huggingface_hub import CommitOperationAdd
        api.create_repo("org/u", exist_ok=True)
        ops = [CommitOperationAdd(p, {str(folder)!r} + "/" + p) for p in ("a.txt", "b.txt")]
        out["oid"] = api.create_commit("org/u", ops, commit_message="push").oid
    """
    one = run_client(env, code)
    two = run_client(env, code)
    assert one["oid"] == two["oid"]
    assert len(hub_server.commits("org/u")) == 2
    assert hub_server.committed_paths == [["a.txt", "b.txt"]]
    # A change to one file uploads only that file.
    (folder / "b.txt").write_bytes(b"beta2")
    three = run_client(env, code)
    assert three["oid"] != one["oid"]
    assert hub_server.committed_paths[-1] == ["b.txt"]
    assert hub_server.files("org/u") == {"a.txt": b"alpha", "b.txt": b"beta2"}


def test_branch_tag_stale_parent_and_private(hub_server, tmp_path):
    env = hub_server.env(tmp_path / "home")
    out = run_client(env, """
        from huggingface_hub import CommitOperationAdd
        api.create_repo("org/b", private=True)
        base = api.create_commit("org/b", [CommitOperationAdd("x.txt", b"x")], commit_message="x").oid
        api.create_branch("org/b", branch="feat/one")
        api.create_commit("org/b", [CommitOperationAdd("y.txt", b"y")], commit_message="y", revision="feat/one")
        api.create_tag("org/b", tag="t1", revision="feat/one")
        out["feat"] = sorted(api.list_repo_files("org/b", revision="feat/one"))
        out["t1"] = sorted(api.list_repo_files("org/b", revision="t1"))
        out["main"] = sorted(api.list_repo_files("org/b"))
        out["private"] = api.model_info("org/b").private
        try:
            api.create_commit("org/b", [CommitOperationAdd("z.txt", b"z")], commit_message="z", parent_commit="0" * 40)
        except Exception as e:
            out["stale"] = getattr(getattr(e, "response", None), "status_code", None)
        try:
            api.create_repo("org/b")
        except Exception as e:
            out["dup"] = getattr(getattr(e, "response", None), "status_code", None)
        out["exist_ok"] = str(api.create_repo("org/b", exist_ok=True))
    """)
    assert out["feat"] == out["t1"] == ["x.txt", "y.txt"]
    assert out["main"] == ["x.txt"]
    assert out["private"] is True
    assert out["stale"] == 412
    assert out["dup"] == 409
    assert out["exist_ok"].endswith("/org/b")
    assert sorted(hub_server.branches("org/b")) == ["feat/one", "main"]


def test_range_requests_for_resumed_downloads(hub_server):
    data = bytes(range(256)) * 64
    hub_server.upload("org/g", {"big.txt": data})
    url = hub_server.endpoint + "/org/g/resolve/main/big.txt"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as r:
        assert r.status == 206
        assert r.read() == data[100:]
        assert r.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as r:
        assert r.headers["ETag"] == f'"{git_blob_sha1(data)}"'
        assert r.headers["X-Repo-Commit"] == hub_server.head("org/g")
        assert int(r.headers["Content-Length"]) == len(data)
