"""Download a minFM repo from the Hub: ``minfm hub pull`` and the ``hf://`` source resolver.

Only safe formats are downloaded (safetensors, JSON/TOML/text, images); a repo that holds
a pickle-format file (``*.bin``, ``*.pt``, ...) is refused outright. The commit that was
actually downloaded is recorded in ``minfm_source.json`` next to the files (and is
readable with :func:`source_info`), so a run can say exactly which weights it used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from minfm_core.errors import MinfmError, first_line
from minfm_core.jsonio import parse_json
from minfm_core.safepath import contained, fresh_dir, is_inside, write_text_atomic

from .errors import hub_errors, scrub, translate
from .uri import HubRef, parse_ref

#: Files a pull downloads (fnmatch patterns, ``*`` crosses folders).
SAFE_PATTERNS = ("*.safetensors", "*.json", "*.jsonl", "*.toml", "*.md", "*.png", "*.jpg", "*.jpeg", "*.txt")
#: The training state (a torch.distributed.checkpoint folder): only on request, it can be large.
TRAINING_STATE_PATTERNS = ("checkpoint/*",)
#: Formats that unpickle on load (arbitrary code execution): never pushed, never pulled.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SOURCE_INFO = "minfm_source.json"
#: Default bounds on one pull (override: --max-files/--max-bytes, MINFM_HUB_MAX_FILES/_BYTES).
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 2**40  # 1 TiB
#: The most files a pull may be allowed (a repo of more is no model repo).
MAX_FILES_LIMIT = 10_000_000
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT_RE = re.compile(r"(?:^|/)models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})$")


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickles(paths: list[str], where: str) -> None:
    bad = sorted(p for p in paths if is_pickle(p))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise MinfmError(
            f"{where}: refusing pickle-format files ({shown}); minFM only exchanges weights as safetensors"
        )


@dataclass(frozen=True)
class Pulled:
    """Where a pulled repo lies and exactly what it is."""

    path: Path
    repo_id: str
    revision: str | None  # as asked (None: the default branch)
    commit: str  # the commit sha the files come from

    @property
    def uri(self) -> str:
        """An ``hf://`` URI pinned to the downloaded commit."""
        return f"hf://{self.repo_id}@{self.commit}"


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (also KB/MB/TB, KiB/MiB/GiB/TiB, or plain bytes)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise MinfmError(f"invalid size {text!r}: expected e.g. 5GB, 500MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(frozen=True)
class Limits:
    """How much one pull may bring: a repo is hostile until checked, and a listing of a
    million files or a petabyte must end before the disk fills."""

    max_files: int = DEFAULT_MAX_FILES
    max_bytes: int = DEFAULT_MAX_BYTES

    @classmethod
    def resolve(cls, max_files: int | None = None, max_bytes: str | int | None = None) -> Limits:
        """Arguments win, then ``MINFM_HUB_MAX_FILES`` / ``MINFM_HUB_MAX_BYTES``, then the defaults."""
        files = max_files if max_files is not None else os.environ.get("MINFM_HUB_MAX_FILES") or DEFAULT_MAX_FILES
        size = max_bytes if max_bytes is not None else os.environ.get("MINFM_HUB_MAX_BYTES") or DEFAULT_MAX_BYTES
        count = int(files) if isinstance(files, int) or (files.strip().isascii() and files.strip().isdigit()) else 0
        if not 1 <= count <= MAX_FILES_LIMIT:  # below 1 every pull would be refused after listing it: a typo
            raise MinfmError(f"invalid file count {files!r} (MINFM_HUB_MAX_FILES / --max-files): "
                             f"expected an integer from 1 to {MAX_FILES_LIMIT}")
        nbytes = parse_size(size)
        if nbytes < 1:
            raise MinfmError(f"invalid size {size!r} (MINFM_HUB_MAX_BYTES / --max-bytes): expected at least 1 byte")
        return cls(count, nbytes)

    def check(self, n_files: int, n_bytes: int, what: str) -> None:
        if n_files > self.max_files:
            raise MinfmError(f"{what}: {n_files} files to download, more than the limit of {self.max_files} "
                             "(raise it with --max-files or MINFM_HUB_MAX_FILES)")
        if n_bytes > self.max_bytes:
            raise MinfmError(f"{what}: {n_bytes} bytes to download, more than the limit of {self.max_bytes} "
                             "(raise it with --max-bytes or MINFM_HUB_MAX_BYTES)")


def pull(ref: str | HubRef, local_dir: str | Path | None = None, *, training_state: bool = False,
         max_files: int | None = None, max_bytes: str | int | None = None) -> Pulled:
    """Download ``ref`` (``org/name[@rev]`` or ``hf://...``) into the HF cache or ``local_dir``.

    With ``training_state`` the ``checkpoint/`` folder (full DCP training state) comes too.
    Before downloading, the repo's file list is checked: no pickle, no name that leaves the
    folder, at most ``max_files`` files and ``max_bytes`` bytes (see :class:`Limits`); the
    downloaded tree is checked again. A failed pull leaves the target as it was.
    Raises MinfmError (one line) for a bad id, a missing repo/revision, a refused repo, or no network.
    """
    from huggingface_hub import HfApi, constants

    ref = parse_ref(ref) if isinstance(ref, str) else ref
    limits = Limits.resolve(max_files, max_bytes)
    patterns = file_filters(training_state)
    what = f"Hub repo {ref}"
    commit = None
    with hub_errors("pull", str(ref)):
        if not constants.HF_HUB_OFFLINE:
            info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
            siblings = list(info.siblings or [])
            check_names([s.rfilename for s in siblings], what)  # the server may list any name
            refuse_pickles([s.rfilename for s in siblings], str(ref))
            wanted = _wanted(siblings, patterns)
            limits.check(len(wanted), sum(max(int(s.size or 0), 0) for s in wanted), what)
            # the sha names a cache folder (and one a failed pull removes): only a real sha counts
            commit = info.sha if isinstance(info.sha, str) and _SHA_RE.match(info.sha) else None
        if local_dir is None:
            path = _pull_to_cache(ref, patterns, commit, limits)
            m = _SNAPSHOT_RE.search(path.as_posix())
            commit = m.group(3) if m else commit  # the folder name is the commit actually downloaded
            pulled = Pulled(path, ref.repo_id, ref.revision, commit or "unknown")
            _record(pulled, pulled.path)
        else:
            if commit is None:  # offline: the folder's own record of the same pull, if any, knows the commit
                prev = source_info(Path(os.path.expanduser(local_dir))) if Path(os.path.expanduser(local_dir)).is_dir() else None
                if prev and prev.get("repo_id") == ref.repo_id and prev.get("revision") == ref.revision:
                    commit = prev["commit"]
            pulled = Pulled(Path(os.path.expanduser(local_dir)), ref.repo_id, ref.revision, commit or "unknown")
            _pull_to_local_dir(pulled, patterns, limits)
    return pulled


def file_filters(training_state: bool) -> dict[str, list[str]]:
    """``snapshot_download``'s ``allow_patterns`` / ``ignore_patterns`` for a pull.

    ``*`` crosses folders, so ``*.json`` alone would also take ``checkpoint/manifest.json``
    and ``checkpoint/rank_0.safetensors``: without the training state its folder is ignored
    whole (half of it reads as a broken checkpoint, and it can be large)."""
    if training_state:
        return {"allow_patterns": [*SAFE_PATTERNS, *TRAINING_STATE_PATTERNS], "ignore_patterns": []}
    return {"allow_patterns": list(SAFE_PATTERNS), "ignore_patterns": list(TRAINING_STATE_PATTERNS)}


def _wanted(siblings: list, patterns: dict[str, list[str]]) -> list:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(siblings, **patterns, key=lambda s: s.rfilename))


_DRIVE_RE = re.compile(r"^[A-Za-z]:")
MAX_NAME_SEGMENT = 200  # bytes; leaves room for the suffixes huggingface_hub adds (.incomplete, .metadata)


def _check_name(name: str, what: str) -> None:
    """A repo file name must be a plain relative path (checked before anything is downloaded)."""
    def refuse(why: str):
        raise MinfmError(f"{what}: refusing file name {_shown(name)}: {why}")

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
    if parts[0] == ".cache":  # huggingface_hub keeps its --local-dir bookkeeping there
        refuse(".cache/ is huggingface_hub's own folder")


def _shown(name) -> str:
    """A name for a one-line message: repr (control characters escaped), long ones cut."""
    return repr(name) if not isinstance(name, str) or len(name) <= 120 else repr(name[:100]) + "..."


def check_names(names: list[str], what: str) -> None:
    for name in names:
        _check_name(name, what)
    files = set(names)
    for name in names:  # "a.json" and "a.json/b.json": one path cannot be a file and a folder
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise MinfmError(f"{what}: refusing file name {_shown(name)}: {'/'.join(parts[:i])!r} is also a file")


def _verify(folder: Path, limits: Limits, what: str, *, local_dir: bool = False) -> None:
    """The downloaded tree, checked again: no symlink out, regular files only, within the limits."""
    n_files = n_bytes = 0
    for dirpath, dirnames, filenames in os.walk(folder):  # symlinked folders are not entered
        rel_dir = Path(dirpath).relative_to(folder)
        if local_dir and rel_dir.parts[:1] == (".cache",):
            continue  # huggingface_hub's own bookkeeping for --local-dir
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if entry.is_symlink() and not is_inside(entry, folder):
                raise MinfmError(f"{what}: refusing {rel}: a symlink leads outside {folder}")
            if name in filenames:
                if not entry.is_file():
                    raise MinfmError(f"{what}: refusing {rel}: not a regular file")
                n_files += 1
                n_bytes += entry.stat().st_size
    limits.check(n_files, n_bytes, what)


def _pull_to_cache(ref: HubRef, patterns: dict[str, list[str]], commit: str | None, limits: Limits) -> Path:
    """snapshot_download into the HF cache; on failure, remove the snapshot (and blobs) this pull created."""
    from huggingface_hub import constants

    repo_cache = Path(constants.HF_HUB_CACHE) / ("models--" + ref.repo_id.replace("/", "--"))
    snapshot = repo_cache / "snapshots" / commit if commit else None
    fresh = snapshot is not None and not os.path.lexists(snapshot)
    blobs = repo_cache / "blobs"
    blobs_before = set(os.listdir(blobs)) if blobs.is_dir() else set()
    try:
        # The asked revision (not the sha) is passed on so the cache records the branch/tag
        # and a later offline `hf://org/name` finds it.
        path = Path(_snapshot(f"Hub repo {ref}", ref.repo_id, revision=ref.revision, **patterns))
        _verify(path, limits, f"Hub repo {ref}")
        return path
    except BaseException:
        if fresh:
            _remove_partial(snapshot, blobs, blobs_before)
        raise


def _snapshot(what: str, repo_id: str, **kwargs) -> str:
    """``snapshot_download``, with the client's own refusals and local file errors as one line.

    Hub and network failures pass on to :func:`minfm_hub.errors.hub_errors`.
    """
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, **kwargs)
    except (ValueError, OSError) as exc:
        if translate(exc, "pull", repo_id) is not None:
            raise
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise MinfmError(scrub(f"{what}: download failed ({why})")) from None


def _remove_partial(snapshot: Path, blobs: Path, blobs_before: set[str]) -> None:
    """Remove a snapshot folder this pull created and the new blobs it links to (plus unfinished
    ``.incomplete`` downloads). Links are removed, never followed; a blob another snapshot made
    meanwhile is left alone unless this snapshot links to it too."""
    ours = {name for name in set(os.listdir(blobs)) - blobs_before if name.endswith(".incomplete")} \
        if blobs.is_dir() else set()
    for dirpath, _, filenames in os.walk(snapshot):
        for name in filenames:
            link = os.path.join(dirpath, name)
            if os.path.islink(link):
                ours.add(os.path.basename(os.readlink(link)))
    shutil.rmtree(snapshot, ignore_errors=True)
    for name in ours - blobs_before:
        with contextlib.suppress(OSError):
            os.unlink(blobs / name)


def _pull_to_local_dir(pulled: Pulled, patterns: dict[str, list[str]], limits: Limits) -> None:
    """Download into a fresh folder beside the target, verify it, then move the files in.

    Nothing is written into the target before every check passed, and every move replaces
    a file (or a symlink that stays inside) instead of writing through it.
    """
    # DIR comes from the user's command line: a symlink there is theirs to follow. The temp
    # folder goes beside the real target, so the final moves are renames on one file system.
    target = Path(os.path.realpath(pulled.path))
    what = f"Hub repo {HubRef(pulled.repo_id, pulled.revision)}"
    if os.path.lexists(target) and not target.is_dir():
        raise MinfmError(f"{pulled.path}: exists and is not a folder")
    with _os_errors(pulled.path):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_dir(target, f".{target.name}.pull-")
    try:
        if target.is_dir():
            _seed(target, tmp)
        _snapshot(what, pulled.repo_id, revision=pulled.revision, local_dir=tmp, **patterns)
        _verify(tmp, limits, what, local_dir=True)
        _record(pulled, tmp)
        with _os_errors(pulled.path):
            if not os.path.lexists(target):
                os.rename(tmp, target)  # one atomic step
                return
            moves = []
            for src in sorted(p for p in tmp.rglob("*") if not p.is_dir()):
                rel = src.relative_to(tmp).as_posix()
                moves.append((src, contained(target, rel, what=f"{what}: --local-dir {pulled.path}")))
            for src, dst in moves:  # every destination was checked before the first move
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _os_errors(where: Path):
    """A file-system failure of our own writes (permissions, a full disk) as one line."""
    try:
        yield
    except OSError as exc:
        raise MinfmError(f"{where}: cannot write the pulled files ({exc.strerror or type(exc).__name__})") from None


def _seed(target: Path, tmp: Path) -> None:
    """Hard-link the target's files into ``tmp`` so unchanged files are not downloaded again.

    huggingface_hub replaces (never rewrites) a data file it downloads, so a link is safe;
    its small ``.cache`` metadata files are rewritten in place, so they are copied. Only
    regular files that really lie inside the target are taken.
    """
    for src in target.rglob("*"):
        if src.is_symlink() or not src.is_file() or not is_inside(src, target):
            continue
        dst = tmp / src.relative_to(target)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.relative_to(target).parts[:1] == (".cache",):
                shutil.copy2(src, dst)
            else:
                os.link(src, dst)
        except OSError:
            return  # another file system, no hard links: download everything again


def _record(pulled: Pulled, folder: Path) -> None:
    """Write ``minfm_source.json`` atomically, replacing (never writing through) a symlink there:
    in the cache a repo's own ``minfm_source.json`` is a link to a shared blob."""
    info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(pulled).items() if k != "path"}
    info["uri"] = pulled.uri
    try:
        write_text_atomic(folder / SOURCE_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only shared cache: source_info() still reads the cache layout


def source_info(path: str | Path) -> dict | None:
    """What a pulled folder is: ``{"repo_id", "revision", "commit", "uri"}``, or None if not a pull."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    f = folder / SOURCE_INFO
    if f.is_file() and f.stat().st_size < 1 << 16:
        try:  # a repo may ship its own (hostile) file under this name: only a well-formed record counts
            info = parse_json(f.read_bytes(), str(f))
            if isinstance(info, dict) and all(isinstance(info.get(k), str) for k in ("repo_id", "commit", "uri")):
                return info
        except (MinfmError, OSError):
            pass
    m = _SNAPSHOT_RE.search(folder.resolve().as_posix())
    if m:
        repo_id = f"{m.group(1)}/{m.group(2)}"
        return {"repo_id": repo_id, "revision": None, "commit": m.group(3), "uri": f"hf://{repo_id}@{m.group(3)}"}
    return None
