"""Paths taken from untrusted text (a Hub repo, a checkpoint manifest, a shard index, a
pulled recipe) and minFM's own atomic writes.

The rule (docs/security.md): a name that comes from outside is relative, has no ``..``
and, once symlinks are followed, stays inside its root. The one sanctioned exception is
the Hugging Face cache layout, where ``models--org--name/snapshots/<sha>/f`` is a symlink
into ``models--org--name/blobs/``: for a root inside a snapshot, the repo's cache folder
is the boundary.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from .errors import MinfmError


def trust_boundary(root: Path) -> Path:
    """The folder that resolved paths under ``root`` must stay in (see the module doc)."""
    real = Path(os.path.realpath(root))
    for parent in (real, *real.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith(("models--", "datasets--")):
            return parent.parent.parent
    return real


#: The file a source resolver writes into a folder it downloaded (contract for source plugins:
#: docs/plugins.md). Whatever lies under it came from outside.
SOURCE_MARKER = "minfm_source.json"


def came_from_outside(path: Path) -> bool:
    """Whether ``path`` lies in a folder a source resolver downloaded: a Hugging Face cache
    snapshot, or a folder below one holding :data:`SOURCE_MARKER` (at any depth: a pulled
    repo's ``a/b/c/d/recipe.toml`` is as foreign as its top-level one)."""
    path = Path(os.path.abspath(path))
    if trust_boundary(path).name.startswith(("models--", "datasets--")):
        return True
    return any((p / SOURCE_MARKER).exists() for p in (path, *path.parents))


def recipe_root(recipe: Path) -> Path | None:
    """The folder a recipe that came with a downloaded model is confined to
    (``load_recipe(..., untrusted_root=...)``), or None for the user's own run directory."""
    recipe = Path(recipe)
    return recipe.parent if came_from_outside(recipe.parent) else None


def file_in_the_way(path: Path | str, where: str) -> str | None:
    """``"<where>: <path> is a file, not a folder"`` (or ``is a link to nothing``) where
    anything but a folder is at ``path``, a folder that is to be written into, and ``"<where>:
    <path> cannot be made: <above> is not a folder"`` where nothing is there and the nearest
    thing above it is no folder; None where a folder is, or nothing below a folder. One rule,
    one wording, for every command that writes into a folder and for ``minfm check``, which
    reports it before the job starts."""
    if os.path.isdir(path):
        return None
    if not os.path.lexists(path):
        # the nearest existing folder above it must be one: `--out notes.txt/sub` (and
        # /dev/null/run) failed only when written, after the model was built, naming no flag
        above = os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(above):
            above = os.path.dirname(above)
        return None if os.path.isdir(above) else f"{where}: {path} cannot be made: {above} is not a folder"
    what = "a link to nothing" if os.path.islink(path) and not os.path.exists(path) else "a file"
    return f"{where}: {path} is {what}, not a folder"


def missing_folder(path: Path | str) -> str | None:
    """What is wrong with ``path`` as a folder to read (``no such folder``, ``a file, not a
    folder``), or None for a folder: a file given where a folder goes was reported missing."""
    if os.path.isdir(path):
        return None
    return "no such folder" if not os.path.lexists(path) else "a file, not a folder"


def require_folder_room(path: Path | str, where: str) -> None:
    """Raise :func:`file_in_the_way`'s problem as a MinfmError."""
    if problem := file_in_the_way(path, where):
        raise MinfmError(problem)


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies inside ``root``'s trust boundary."""
    boundary = trust_boundary(root)
    real = Path(os.path.realpath(path))
    return real == boundary or boundary in real.parents


def relative_inside(root: Path, name: str, *, what: str) -> Path:
    """``root / name`` for a ``name`` read from untrusted text that must name a place below
    ``root`` as written, or a MinfmError naming ``what``.

    Refused: a non-string or empty name, an absolute path, a ``..`` component, a NUL or
    backslash. Symlinks are not looked at (a dataset folder of one's own may link its images
    in from elsewhere); :func:`contained` refuses those too.
    """
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise MinfmError(f"{what}: refusing path {name!r}: not a plain relative path")
    pure = PurePosixPath(name)
    if pure.is_absolute() or name.startswith("~") or any(part == ".." for part in pure.parts):
        raise MinfmError(f"{what}: refusing path {name!r}: it leaves {root}")
    return Path(root) / pure


def contained(root: Path, name: str, *, what: str) -> Path:
    """:func:`relative_inside`, and a path whose symlinks lead outside ``root`` is refused too
    (see :func:`trust_boundary`)."""
    path = relative_inside(root, name, what=what)
    if not is_inside(path, root):
        raise MinfmError(f"{what}: refusing path {name!r}: a symlink leads outside {root}")
    return path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill a fresh temporary file beside ``path``, then rename it into place:
    ``path`` ends up whole or untouched (an interrupted write, a full disk), and a symlink
    there is replaced, never written through. The temporary name is unpredictable and made
    with ``O_EXCL``, so no link can be planted at it either. A device, FIFO or socket at
    ``path`` is refused: the rename would replace it (``--out /dev/null`` run as root
    replaced /dev/null with a plain file)."""
    path = Path(path)
    refuse_special(path)
    tmp = _fresh_file(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        try:
            write(Path(tmp))
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:  # (matplotlib's savefig): name the file
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            # A writer that renames its own temporary file over ours (safetensors' save_file
            # does) leaves mkstemp's 0600: exported weights, checkpoints and latent caches
            # were unreadable to the user's group whatever the umask.
            os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name points at it
        finally:
            os.close(fd)
        try:
            os.replace(tmp, path)  # rename replaces a symlink itself, never its target
        except OSError as exc:  # e.g. a folder there
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def refuse_special(path: Path) -> None:
    """A MinfmError where ``path`` is a device, FIFO or socket (what :func:`write_atomic`
    refuses to replace): for a command to say so before its work, not after it."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there (or not reachable: the write names the problem)
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):  # (a folder: the rename says so)
        kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
        raise MinfmError(f"{path}: is a {kind}, not a file; refusing to replace it (choose a file name)")


def _fresh_file(path: Path) -> str:
    """A new empty file beside ``path`` under an unpredictable name, as ``mkstemp`` makes one
    but with the permissions the user's umask gives (``mkstemp``'s 0600 would make every
    exported model, checkpoint manifest and latent cache unreadable to the user's group)."""
    return _fresh(path, f".{path.name}.", ".tmp",
                  lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)))


def fresh_dir(beside: Path, prefix: str) -> Path:
    """A new empty folder beside ``beside`` (``mkdtemp`` with the umask's permissions, not 0700:
    it is renamed into place whole)."""
    return Path(_fresh(beside, prefix, "", lambda tmp: os.mkdir(tmp, 0o777)))


def _fresh(path: Path, prefix: str, suffix: str, make: Callable[[str], None]) -> str:
    for _ in range(100):
        tmp = str(path.parent / f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            make(tmp)  # O_EXCL / mkdir: fails on anything already there, a planted link too
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:  # named for the file asked for, not the temporary one
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    raise OSError(errno.EEXIST, "no free temporary name", str(path))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (:func:`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
