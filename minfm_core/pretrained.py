"""Where pretrained weights come from: a local path, or a Hub reference.

Shared by every component that loads pretrained weights (T5, CLIP, VAE, FLUX).

A reference is a local path (file or folder), a Hub reference
``[hf://]org/name[@revision][/path/in/repo]``, e.g. ``black-forest-labs/FLUX.1-schnell/vae``
(a folder of the repo) or ``black-forest-labs/FLUX.1-schnell/ae.safetensors`` (a file), or
the URI of another registered source (``s3://bucket/t5``), handed to that scheme's resolver
whole with ``subpath=""`` (or the file a component asks for in it). A local path that
exists always wins.

The core never talks to the Hub itself: a Hub reference is handed to the source
registered for the ``hf`` scheme (the hub plugin), as
``resolve("hf://org/name[@rev]", subpath="path/in/repo")`` -- the declared ``subpath``
keyword of :class:`minfm_core.protocols.Source`. That resolver reads the local Hugging Face
cache first and downloads only what is missing, unless the Hub is offline
(``HF_HUB_OFFLINE=1``, see :func:`offline`); then it raises one :class:`MinfmError`
naming the reference and how to fetch it, so the CLI prints one line and exits 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from .errors import MinfmError

#: The source scheme that resolves Hub references (registered by the hub plugin).
HUB_SCHEME = "hf"

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_RE = re.compile(rf"^(?P<repo>{_SEGMENT}/{_SEGMENT})(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?\Z")


@attrs.frozen
class HubRef:
    """A parsed Hub reference: repository, revision and a path inside the repository."""

    repo_id: str
    revision: str | None = None
    subpath: str = ""

    def join(self, filename: str | None) -> str:
        return str(PurePosixPath(self.subpath, filename or "")) if (self.subpath or filename) else ""

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}" + (f"/{self.subpath}" if self.subpath else "")


def parse_hub_ref(ref: str) -> HubRef | None:
    """``[hf://]org/name[@rev][/path]`` -> :class:`HubRef`, or None when ``ref`` cannot be a Hub id."""
    ref = ref.removeprefix(f"{HUB_SCHEME}://")
    if ref.startswith(("/", ".", "~")) or "\\" in ref or "//" in ref:
        return None
    m = _HUB_RE.match(ref)
    if m is None:
        return None
    sub = (m["sub"] or "").strip("/")
    if any(part in ("", ".", "..") for part in sub.split("/")) and sub:
        return None
    return HubRef(m["repo"], m["rev"], sub)


def is_local(ref: str) -> bool:
    return Path(os.path.expanduser(ref)).exists()


def offline() -> bool:
    """Whether nothing may be downloaded: ``HF_HUB_OFFLINE`` set as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def reference_problem(ref: str, *, pretrained: bool = True) -> str | None:
    """What is wrong with a reference on its face, without reading it (None: nothing): blank, a
    URI of a scheme no plugin resolves, an ``hf://`` that is no Hub id, or (``pretrained``: a
    path or ``org/name``) neither an existing path nor a Hub id. Whether a remote one exists
    is found by resolving it. ``minfm check`` and :func:`resolve_pretrained` both use this."""
    from .registry import get_registry

    scheme = ref.split("://", 1)[0] if "://" in ref else None
    if not ref.strip():
        return f"{ref!r} is blank; leave it unset (or name a path or a Hub reference)"
    if scheme is not None and scheme not in (sources := get_registry().names("source")):
        return f"{ref}: no plugin resolves the source scheme {scheme!r} (installed: {', '.join(sources) or 'none'})"
    if scheme == HUB_SCHEME and parse_hub_ref(ref) is None:
        return f"{ref}: not a Hub reference of the form hf://org/name[@revision]" + ("[/path]" if pretrained else "")
    if pretrained and scheme is None and not is_local(ref) and parse_hub_ref(ref) is None:
        return f"{ref}: no such file or directory (and not a Hub id of the form org/name)"
    return None


def resolve_pretrained(ref: str, filename: str | None = None) -> Path:
    """A local file or folder for a path, an ``[hf://]org/name[@rev][/path]`` Hub reference or
    another source's ``scheme://...`` URI.

    With ``filename``, the file of that name inside the referenced folder. A Hub
    reference goes to the ``hf`` source's resolver with ``subpath=`` (cache first); another
    URI to its scheme's resolver, whole, with ``subpath=filename`` (``""``: what it names).
    """
    from .sources import resolve_source

    path = Path(os.path.expanduser(ref))
    if ref.strip() and path.exists():  # (a blank one is no path: Path("") is the working folder)
        target = path / filename if filename else path
        if not target.exists():
            raise MinfmError(f"{ref}: has no {filename}")
        return target
    if problem := reference_problem(ref):
        raise MinfmError(problem)
    hub = parse_hub_ref(ref)
    if hub is None:  # another source's URI
        return resolve_source(ref, subpath=filename or "")
    rev = f"@{hub.revision}" if hub.revision else ""
    return resolve_source(f"{HUB_SCHEME}://{hub.repo_id}{rev}", subpath=hub.join(filename))


def recipe_refs(resolved) -> list[tuple[str, str]]:
    """(slot path, reference) for every pretrained reference in a resolved recipe, in slot order."""
    out: list[tuple[str, str]] = []
    for path, slot in resolved.slots.items():
        for ref in pretrained_refs(slot.config):
            if (path, ref) not in out:
                out.append((path, ref))
    return out


def resolve_recipe_refs(resolved) -> None:
    """Every pretrained reference of ``resolved``, local or fetched (from the cache, else the
    Hub): a job calls it before it writes anything, so that missing weights leave no trace."""
    for path, ref in recipe_refs(resolved):
        try:
            resolve_pretrained(ref)
        except MinfmError as exc:
            raise MinfmError(f"{path}: {exc}") from None


def pretrained_refs(cfg: Any) -> tuple[str, ...]:
    """The pretrained references a component config names.

    Declared by :class:`minfm_core.protocols.PretrainedRefsConfig` (a ``pretrained_refs``
    property) or :class:`~minfm_core.protocols.PretrainedConfig` (one ``pretrained`` string).
    """
    from .protocols import PretrainedConfig, PretrainedRefsConfig

    if isinstance(cfg, PretrainedRefsConfig):
        refs = cfg.pretrained_refs
    elif isinstance(cfg, PretrainedConfig):
        refs = (cfg.pretrained,) if isinstance(cfg.pretrained, str) else ()
    else:
        refs = ()
    return tuple(r for r in refs if r)
