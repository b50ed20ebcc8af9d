"""A small Hugging Face Hub-compatible HTTP server for offline tests.

The tests drive it with the *real* ``huggingface_hub`` client (see docs/hub.md,
"Testing without the Hub"): nothing of the client is mocked, so
the wire protocol is what is tested. Only what the client needs for
create/upload/commit/branch/tag/info/tree/download is implemented; files always
travel base64 inside the NDJSON commit body (preupload answers ``regular``), so
neither LFS nor Xet is involved.

Usage::

    with HubServer() as hub:
        hub.upload("org/model", {"a.json": b"{}"})          # seed directly
        env = hub.env(tmp_path / "hf_home")                 # for a subprocess
        subprocess.run([...], env=env)
        assert len(hub.commits("org/model")) == 2           # newest first

State is in memory; each repo keeps every commit as a full file tree, and
branches/tags point to commits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub calls a file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    description: str
    files: dict[str, bytes]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        """The commit sha a branch, tag or full sha names, or None."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if SHA_RE.match(rev) and rev in self.commits:
            return rev
        return None


class HubError(Exception):
    """An HTTP error answer: status, ``X-Error-Code`` and message."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit
        self.extra = extra or {}


class HubState:
    """All repos, guarded by one lock (the server is threaded)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.committed_paths: list[list[str]] = []  # file paths sent in each commit request
        self._counter = 0
        self.fail_commits = 0  # answer this many next commit requests with HTTP 500, applying nothing
        self.fail_downloads: set[str] = set()  # file paths whose download (GET resolve) answers HTTP 500

    def repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository Not Found for url: {repo_id}.", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool = False) -> Repo:
        key = (repo_type, repo_id)
        if key in self.repos:
            raise HubError(409, "You already created this model repo")
        repo = Repo(repo_id, repo_type, private)
        self.repos[key] = repo
        self.add_commit(repo, "main", "initial commit", "", {}, None)
        return repo

    def add_commit(self, repo: Repo, branch: str, message: str, description: str,
                   files: dict[str, bytes], parent: str | None) -> Commit:
        self._counter += 1
        seed = f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n{sorted(files)}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, message, description, dict(files))
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def tree(self, repo: Repo, rev: str) -> tuple[str, dict[str, bytes]]:
        sha = repo.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha, repo.commits[sha].files


def _dir_oid(prefix: str, files: dict[str, bytes]) -> str:
    inner = sorted((p, git_blob_sha1(b)) for p, b in files.items() if p.startswith(prefix + "/"))
    return hashlib.sha1(json.dumps(inner).encode()).hexdigest()


def _entries(files: dict[str, bytes], base: str, recursive: bool) -> list[dict]:
    """Tree entries under ``base`` ('' = root), files and directories, as the Hub lists them."""
    prefix = base + "/" if base else ""
    out: dict[str, dict] = {}
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):].split("/")
        depth = len(rest) if recursive else 1
        for i in range(1, min(depth, len(rest) - 1) + 1):
            d = prefix + "/".join(rest[:i])
            out.setdefault(d, {"type": "directory", "oid": _dir_oid(d, files), "path": d})
        if recursive or len(rest) == 1:
            out[path] = _file_entry(path, files[path])
    return list(out.values())


def _file_entry(path: str, data: bytes) -> dict:
    return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "minfm-test-hub/1"

    # -- plumbing ---------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state  # type: ignore[attr-defined]

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]  # type: ignore[attr-defined]
        return f"http://{host}:{port}"

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", head: bool = False, length: int | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        segs = [s for s in url.path.split("/") if s]  # segments stay quoted until used
        with self.state.lock:
            self.state.log.append((method, url.path))
        try:
            body = self._body() if method in ("POST", "PUT", "DELETE") else b""
            self._route(method, segs, query, body)
        except HubError as e:
            headers = {}
            if e.code:
                headers["X-Error-Code"] = e.code
                headers["X-Error-Message"] = e.message
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            body = json.dumps({"error": e.message, **e.extra}).encode()
            self._send(e.status, body, headers, head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- routing ----------------------------------------------------------------------
    def _route(self, method, segs, query, body):
        st = self.state
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self._create(json.loads(body or b"{}"))
            if method == "POST" and rest == ["validate-yaml"]:
                return self._json({"errors": [], "warnings": []})
            if method == "GET" and rest == ["whoami-v2"]:
                return self._json({"type": "user", "name": "tester", "fullname": "Tester", "orgs": [],
                                   "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                repo_type = REPO_TYPES[rest[0]]
                repo_id = f"{unquote(rest[1])}/{unquote(rest[2])}"
                with st.lock:
                    repo = st.repo(repo_type, repo_id)
                    self._check_access(repo)
                    return self._repo_api(method, repo, rest[3:], query, body)
            raise HubError(404, f"no route for {method} /{'/'.join(segs)}")
        # /[datasets|spaces/]org/name/resolve/rev/path...
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
        if method in ("GET", "HEAD") and len(segs) >= 5 and segs[2] == "resolve":
            repo_id = f"{unquote(segs[0])}/{unquote(segs[1])}"
            path = unquote("/".join(segs[4:]))
            with st.lock:
                repo = st.repo(repo_type, repo_id)
                self._check_access(repo)
                sha, files = st.tree(repo, unquote(segs[3]))
                data = files.get(path)
            if data is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=sha)
            if method == "GET" and path in st.fail_downloads:
                raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
            return self._resolve(method, sha, data)
        raise HubError(404, f"no route for {method} /{'/'.join(segs)}")

    def _check_access(self, repo: Repo):
        # Private repos need some token (any value): enough to test that one is sent.
        if repo.private and not self.headers.get("Authorization"):
            raise HubError(401, "Repository Not Found", "RepoNotFound")

    def _create(self, req: dict):
        repo_type = req.get("type") or "model"
        name, org = req["name"], req.get("organization") or "tester"
        repo_id = f"{org}/{name}"
        prefix = self.endpoint + ("" if repo_type == "model" else f"/{repo_type}s")
        url = f"{prefix}/{repo_id}"
        with self.state.lock:
            try:
                # "private" in older clients, "visibility" ("private" | "protected" | "public") in newer ones
                private = bool(req.get("private")) or req.get("visibility") in ("private", "protected")
                self.state.create(repo_type, repo_id, private)
            except HubError as e:
                e.extra = {"url": url}  # the Hub names the existing repo in its 409
                raise
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _resolve(self, method: str, sha: str, data: bytes):
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        status, payload = 200, data
        m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if m and method == "GET":
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise HubError(416, "Requested range not satisfiable")
            payload = data[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(payload) - 1}/{len(data)}"
        self._send(status, payload, headers, "application/octet-stream", head=method == "HEAD",
                   length=len(payload))

    def _repo_api(self, method, repo: Repo, rest, query, body):
        st = self.state
        action = rest[0] if rest else ""
        rev = unquote(rest[1]) if len(rest) > 1 else "main"
        if method == "GET" and action in ("", "revision"):
            sha, files = st.tree(repo, rev)
            return self._json(self._info(repo, sha, files))
        if method == "GET" and action == "refs":
            def ref(kind, name, sha):
                return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
            return self._json({"branches": [ref("heads", n, s) for n, s in repo.branches.items()],
                               "tags": [ref("tags", n, s) for n, s in repo.tags.items()],
                               "converts": [], "pullRequests": []})
        if method == "GET" and action == "tree":
            sha, files = st.tree(repo, rev)
            base = unquote("/".join(rest[2:])).strip("/")
            if base and base in files:
                return self._json([_file_entry(base, files[base])])
            if base and not any(p.startswith(base + "/") for p in files):
                raise HubError(404, f"Entry not found: {base}", "EntryNotFound", commit=sha)
            recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
            return self._json(_entries(files, base, recursive))
        if method == "GET" and action == "commits":
            sha, _ = st.tree(repo, rev)
            out = []
            while sha:
                c = repo.commits[sha]
                out.append({"id": c.sha, "title": c.message, "message": c.description, "authors": [],
                            "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(c.date))})
                sha = c.parent
            return self._json(out)
        if method == "POST" and action == "paths-info":
            sha, files = st.tree(repo, rev)
            if self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(body).get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            out = []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    out.append(_file_entry(p, files[p]))
                elif any(f.startswith(p + "/") for f in files):
                    out.append({"type": "directory", "oid": _dir_oid(p, files), "path": p})
            return self._json(out)
        if method == "POST" and action == "preupload":
            _, files = st.tree(repo, rev)
            req = json.loads(body)
            return self._json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                for f in req.get("files", [])
            ]})
        if method == "POST" and action == "commit":
            return self._commit(repo, rev, body)
        if action == "branch" and len(rest) > 1:
            name = unquote("/".join(rest[1:]))
            if method == "DELETE":
                if repo.branches.pop(name, None) is None:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                return self._json({})
            if method == "POST":
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                sha, _ = st.tree(repo, start)
                if name in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{name}")
                repo.branches[name] = sha
                return self._json({})
        if action == "tag" and len(rest) > 1:
            if method == "DELETE":
                name = unquote("/".join(rest[1:]))
                if repo.tags.pop(name, None) is None:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                return self._json({})
            if method == "POST":
                req = json.loads(body or b"{}")
                sha, _ = st.tree(repo, rev)
                if req["tag"] in repo.tags:
                    raise HubError(409, f"Tag already exists: {req['tag']}")
                repo.tags[req["tag"]] = sha
                return self._json({"name": req["tag"]})
        raise HubError(404, f"no route for {method} {'/'.join(rest)}")

    def _info(self, repo: Repo, sha: str, files: dict[str, bytes]) -> dict:
        commit = repo.commits[sha]
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": sha, "private": repo.private, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": None,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.date)),
            "siblings": [{"rfilename": p, "size": len(b), "blobId": git_blob_sha1(b)} for p, b in sorted(files.items())],
        }

    def _commit(self, repo: Repo, branch: str, body: bytes):
        st = self.state
        if branch not in repo.branches:
            if repo.resolve(branch):
                raise HubError(400, f"Cannot commit to {branch}: not a branch")
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if st.fail_commits > 0:  # a failure after the whole body arrived: nothing may be applied
            st.fail_commits -= 1
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        head = repo.branches[branch]
        files = dict(repo.commits[head].files)
        header: dict = {}
        sent: list[str] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported by the test hub")
                files[value["path"]] = base64.b64decode(value["content"])
                sent.append(value["path"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
            else:  # lfsFile / copies would need LFS storage, which we never advertise
                raise HubError(400, f"unsupported commit operation {key!r} in the test hub")
        parent = header.get("parentCommit")
        if parent and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = st.add_commit(repo, branch, header.get("summary") or "", header.get("description") or "",
                               files, head)
        st.committed_paths.append(sent)
        self._json({"commitOid": commit.sha, "commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.sha}",
                    "commitMessage": commit.message, "pullRequestUrl": None, "success": True})


class HubServer:
    """A threaded in-process Hub on 127.0.0.1 (random port); use as a context manager.

    A test's hostile variant subclasses it with its own ``handler`` (a ``_Handler`` subclass,
    which reaches the server object as ``self.server.hub``).
    """

    handler: type[_Handler] = _Handler

    def __init__(self):
        self.state = HubState()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> HubServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        httpd.daemon_threads = True
        httpd.state = self.state  # type: ignore[attr-defined]
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, hf_home: str | os.PathLike, token: str = "hf_test_token_0123456789", **extra: str) -> dict[str, str]:
        """Environment for a subprocess using this server (set before huggingface_hub is imported)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update({
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(hf_home),
            "HF_TOKEN": token,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
            "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
        })
        Path(hf_home).mkdir(parents=True, exist_ok=True)
        env.update(extra)
        return env

    # -- direct access for tests ------------------------------------------------------
    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> None:
        with self.state.lock:
            self.state.create(repo_type, repo_id, private)

    def upload(self, repo_id: str, files: dict[str, bytes], revision: str = "main",
               message: str = "seed", repo_type: str = "model", delete: tuple[str, ...] = ()) -> str:
        """Commit ``files`` (added/overwritten, ``delete`` removed) on a branch; returns the commit sha.

        Creates the repo, and the branch (from main), when missing.
        """
        with self.state.lock:
            if (repo_type, repo_id) not in self.state.repos:
                self.state.create(repo_type, repo_id)
            repo = self.state.repo(repo_type, repo_id)
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            head = repo.branches[revision]
            files_now = dict(repo.commits[head].files)
            for p in delete:
                files_now.pop(p, None)
            files_now.update({p: bytes(b) for p, b in files.items()})
            return self.state.add_commit(repo, revision, message, "", files_now, head).sha

    def tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model") -> str:
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            sha, _ = self.state.tree(repo, revision)
            repo.tags[tag] = sha
            return sha

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``revision``, newest first (the initial empty commit last)."""
        with self.state.lock:
            repo = self.state.repo(repo_type, repo_id)
            sha, out = repo.resolve(revision), []
            while sha:
                out.append(repo.commits[sha])
                sha = repo.commits[sha].parent
            return out

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The full file tree at ``revision``."""
        with self.state.lock:
            return dict(self.state.tree(self.state.repo(repo_type, repo_id), revision)[1])

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self.state.lock:
            return self.state.tree(self.state.repo(repo_type, repo_id), revision)[0]

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        with self.state.lock:
            return dict(self.state.repo(repo_type, repo_id).branches)

    def has_repo(self, repo_id: str, repo_type: str = "model") -> bool:
        with self.state.lock:
            return (repo_type, repo_id) in self.state.repos

    def fail_next_commits(self, n: int = 1) -> None:
        """Answer the next ``n`` commit requests with HTTP 500 (the repo stays as it was)."""
        with self.state.lock:
            self.state.fail_commits = n

    def fail_downloads(self, *paths: str) -> None:
        """Answer every download of these file paths with HTTP 500 (a pull that breaks half-way)."""
        with self.state.lock:
            self.state.fail_downloads = set(paths)

    @property
    def committed_paths(self) -> list[list[str]]:
        """For each commit received over HTTP, the file paths whose content it carried."""
        with self.state.lock:
            return [list(p) for p in self.state.committed_paths]

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request received, as (method, path)."""
        with self.state.lock:
            return list(self.state.log)
