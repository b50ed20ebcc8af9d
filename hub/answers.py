"""What a Hub server answers, checked before anything acts on it.

huggingface_hub names files after what the server says (blobs/<ETag>, snapshots/<commit>,
refs/<rev>) and downloads the names a listing gives: a hostile server answering "../../x"
would make it write outside the cache. Repo file names, commit shas and ETags are checked
here, for minFM's own reading of a listing and, through a response hook, for the client's.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
from urllib.parse import unquote, urljoin, urlsplit

from minfm_core.errors import MinfmError

SHA_RE = re.compile(r"^[0-9a-f]{40}\Z")
#: An ETag the client may name a blob after: a git blob sha1 or an LFS sha256 (quoted, maybe weak).
_ETAG_RE = re.compile(r'^(?:W/)?"?(?:[0-9a-f]{40}|[0-9a-f]{64})"?\Z')


_DRIVE_RE = re.compile(r"^[A-Za-z]:")
MAX_NAME_SEGMENT = 200  # bytes; leaves room for the suffixes huggingface_hub adds (.incomplete, .metadata)
#: A name deeper or longer than this is no model file; 2000 segments made the client recurse to death.
MAX_NAME_DEPTH = 32  # path segments
MAX_NAME_BYTES = 1024


def check_name(name: str, what: str) -> None:
    """A repo file name must be a plain relative path (checked before anything is downloaded)."""
    def refuse(why: str):
        raise MinfmError(f"{what}: refusing file name {short_name(name)}: {why}")

    if not isinstance(name, str) or not name:
        refuse("not a file name")
    parts = name.split("/")
    if name.startswith(("/", "~")) or _DRIVE_RE.match(name) or any(p in ("..", ".", "") for p in parts):
        refuse("it leaves the repo folder")
    # Non-printable characters: a newline in a name forges output lines, a text-direction
    # override makes it display as another name. A backslash is a separator on Windows.
    if not name.isprintable() or "\\" in name:
        refuse("it holds a backslash or a non-printable character")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_NAME_SEGMENT for p in parts):
        refuse(f"a path segment longer than {MAX_NAME_SEGMENT} bytes")
    if len(parts) > MAX_NAME_DEPTH or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        refuse(f"more than {MAX_NAME_DEPTH} path segments or {MAX_NAME_BYTES} bytes")
    if parts[0] == ".cache":  # huggingface_hub keeps its --local-dir bookkeeping there
        refuse(".cache/ is huggingface_hub's own folder")


def short_name(name) -> str:
    """A name for a one-line message: repr (control characters escaped), long ones cut."""
    return repr(name) if not isinstance(name, str) or len(name) <= 120 else repr(name[:100]) + "..."


def check_names(names: list[str], what: str) -> None:
    for name in names:
        check_name(name, what)
    files = set(names)
    for name in names:  # "a.json" and "a.json/b.json": one path cannot be a file and a folder
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise MinfmError(f"{what}: refusing file name {short_name(name)}: {'/'.join(parts[:i])!r} is also a file")


def checked_commit(sha, what: str) -> str:
    """The repo info's commit sha, which the client names cache folders after: 40 hex digits or refused."""
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise MinfmError(f"{what}: the Hub answered commit {short_name(sha)}, which is not a commit sha; refusing it")
    return sha


# -- answers checked before the client uses them ------------------------------------------------
# huggingface_hub names files after what the server says: blobs/<ETag>, snapshots/<commit>,
# .no_exist/<X-Repo-Commit>/, refs/<rev> holding the info's sha. A server answering "../../x"
# makes it write outside the cache. A response hook on the client's shared HTTP session refuses
# such an answer before the client reads it; it checks only while a minFM Hub call runs, so other
# users of huggingface_hub in the same process see no difference.

_API_RE = re.compile(r"/api/(?:models|datasets|spaces)/([^/]+)/([^/]+)(/revision/[^/]+|/tree/.*)?/?\Z")
_RESOLVE_RE = re.compile(r"/resolve(?:-cache)?/")
_checking = 0  # minFM Hub calls in progress, in any thread (the client downloads in a thread pool)
_checking_lock = threading.Lock()


_xet_setting = False  # the client's HF_HUB_DISABLE_XET before the first call in progress


@contextlib.contextmanager
def checked_answers():
    """Check every Hub answer inside (see :func:`_check_answer`). Files come over HTTP only:
    with Xet storage the client's hf_xet would stream them from a storage server that a Hub
    answer (a resolve header, a tree listing's ``xetHash``) names, past the response hook and
    its byte count (:func:`download_budget`); the Hub serves every file over HTTP too."""
    global _checking, _xet_setting
    from huggingface_hub import constants, get_session

    session = get_session()  # recreated after a fork or set_client_factory: (re)attach each time
    hooks = session.event_hooks["response"] if hasattr(session, "event_hooks") else session.hooks["response"]
    asks = session.event_hooks["request"] if hasattr(session, "event_hooks") else []
    with _checking_lock:
        if _check_answer not in hooks:
            hooks.append(_check_answer)
        if _uncompressed not in asks:
            asks.append(_uncompressed)
        if _checking == 0:
            _xet_setting, constants.HF_HUB_DISABLE_XET = constants.HF_HUB_DISABLE_XET, True
        _checking += 1
    try:
        yield
    finally:
        with _checking_lock:
            _checking -= 1
            if _checking == 0:
                constants.HF_HUB_DISABLE_XET = _xet_setting


# -- bytes on the wire ---------------------------------------------------------------------------
# The listing's sizes are checked against the limits before a pull, but the client trusts the
# server for what it then streams, and compares sizes only after writing a whole file: a
# server listing 7 bytes could fill the disk. Inside download_budget, the bodies of file
# downloads (GETs outside /api/, the resolve answers and any CDN they lead to) may total only
# what the listing said; an API answer (JSON, read whole into memory) at most MAX_API_BYTES.

#: A repo info or tree page: 10,000 files list in ~2 MB.
MAX_API_BYTES = 256 << 20


class _Budget:
    def __init__(self, total: int, what: str, bound: str = "bytes it listed") -> None:
        self.total, self.left, self.what, self.bound = total, total, what, bound
        self.lock = threading.Lock()

    def take(self, n: int, url, *, declared: bool = False) -> None:
        """Count ``n`` bytes read (``declared``: only check that a body of ``n`` would fit)."""
        with self.lock:
            over = n > self.left
            if not declared:
                self.left -= n
        if over:
            raise MinfmError(f"{self.what}: the Hub at {url.scheme}://{url.netloc} sent more than the {self.total} "
                             f"{self.bound}; refusing it")


_budget: _Budget | None = None


@contextlib.contextmanager
def download_budget(total: int, what: str):
    """File bodies downloaded inside (any thread) may total at most ``total`` bytes."""
    global _budget
    outer, _budget = _budget, _Budget(total, what)
    try:
        yield
    finally:
        _budget = outer


def _uncompressed(request) -> None:
    """httpx request hook: ask for bodies as they are (the count is of the bytes that arrive)."""
    if _checking:
        request.headers["Accept-Encoding"] = "identity"


def _cap_body(response, url, cap: _Budget) -> None:
    """Count ``response``'s body against ``cap`` as the client reads it; a declared length over
    it is refused before anything is read, and so is a compressed body (asked for uncompressed,
    :func:`_uncompressed`): 48 KiB of gzip unpack to 48 MiB, past a count of the bytes that
    arrive. httpx-style clients only (huggingface_hub >= 1); with requests, the client's own
    size check after the download remains."""
    stream = getattr(response, "stream", None)
    base = getattr(sys.modules.get(type(response).__module__.split(".")[0]), "SyncByteStream", None)
    if base is None or not isinstance(stream, base):
        return
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise MinfmError(f"{cap.what}: the Hub at {url.scheme}://{url.netloc} sent a {short_name(encoding)}-compressed "
                         "body, asked for it uncompressed; refusing it (its unpacked size is not bounded)")
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit():
        cap.take(int(length), url, declared=True)

    class Capped(base):  # type: ignore[misc, valid-type]
        def __iter__(self):
            for chunk in stream:
                cap.take(len(chunk), url)
                yield chunk

        def close(self) -> None:
            stream.close()

    response.stream = Capped()


def _check_answer(response, *args, **kwargs) -> None:
    """httpx (and requests) response hook: refuse a commit sha or ETag that is no hash, and file
    names in a repo listing that :func:`check_names` refuses (the listing the client downloads
    from need not be the one minFM checked)."""
    if not _checking:
        return
    url = urlsplit(str(response.url))

    def refuse(field: str, value) -> None:
        raise MinfmError(f"the Hub at {url.scheme}://{url.netloc} answered {short_name(unquote(url.path))} with "
                         f"{field} {short_name(value)}, which is not a hash; refusing it")

    if 200 <= response.status_code < 300 and response.request.method == "GET":
        if _API_RE.search(url.path):
            _cap_body(response, url, _Budget(MAX_API_BYTES, f"Hub answer {short_name(unquote(url.path))}",
                                             "bytes an answer may hold"))
        elif _budget is not None:
            _cap_body(response, url, _budget)
    location = response.headers.get("Location")
    if location and 300 <= response.status_code < 400 and urlsplit(urljoin(str(response.url), location))[:2] == url[:2]:
        return  # followed on the same server: the client uses the answer it leads to, checked here too
    commit = response.headers.get("X-Repo-Commit")
    if commit is not None and not SHA_RE.match(commit):
        refuse("X-Repo-Commit", commit)
    if _RESOLVE_RE.search(url.path):  # a file's metadata (a CDN's own ETags are not used as names)
        header = "X-Linked-Etag" if "X-Linked-Etag" in response.headers else "ETag"  # as the client picks
        value = response.headers.get(header)
        if value is not None and not _ETAG_RE.match(value):
            refuse(header, value)
    m = _API_RE.search(url.path)
    if m is None or response.status_code != 200:
        return
    try:  # a repo's info or listing: small, and read whole by the client anyway
        data = json.loads(response.read() if hasattr(response, "read") else response.content)
    except (ValueError, RecursionError):
        return  # not JSON: the client's own error
    if isinstance(data, dict) and "sha" in data and not (isinstance(data["sha"], str) and SHA_RE.match(data["sha"])):
        refuse("commit", data["sha"])
    what = f"Hub repo {unquote(m.group(1))}/{unquote(m.group(2))}"
    entries = data.get("siblings") if isinstance(data, dict) else data
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("type", "file") == "file":
            check_name(entry.get("rfilename", entry.get("path")), what)
