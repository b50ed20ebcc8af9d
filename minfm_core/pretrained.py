"""Where pretrained weights come from: a local path, or a Hub id in the local HF cache.

Shared by every component that loads pretrained weights (T5, CLIP, VAE, FLUX).

A reference is either a local path (file or folder) or a Hub reference
``org/name[@revision][/path/in/repo]``, e.g. ``black-forest-labs/FLUX.1-schnell/vae``
(a folder of the repo) or ``black-forest-labs/FLUX.1-schnell/ae.safetensors`` (a file).
A local path that exists always wins.

Hub references are read from the local Hugging Face cache first (no network). When a
reference is not cached, it is downloaded unless the Hub is offline
(``HF_HUB_OFFLINE=1``); offline and not cached gives one :class:`MinfmError` naming the
reference and how to fetch it, so the CLI prints one line and exits 2 instead of a
stack trace from deep inside transformers or diffusers.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from .errors import MinfmError

#: Files of a folder reference that are worth fetching: configs, safetensors weights
#: (and their shard index), tokenizer files. Never pickled weights (.bin, .pt, .ckpt).
FOLDER_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt")

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_RE = re.compile(rf"^(?P<repo>{_SEGMENT}/{_SEGMENT})(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?$")


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
    """``org/name[@rev][/path]`` -> :class:`HubRef`, or None when ``ref`` cannot be a Hub id."""
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
    return Path(ref).expanduser().exists()


def _fetch_hint(hub: HubRef) -> str:
    return (
        f"fetch it first with `minfm cache models RECIPE`, `minfm hub pull {hub.repo_id}` "
        f"or `hf download {hub.repo_id}`"
    )


def _offline() -> bool:
    import huggingface_hub

    check = getattr(huggingface_hub, "is_offline_mode", None)
    if check is not None:
        return bool(check())
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_file(hub: HubRef, path: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found: Any = try_to_load_from_cache(hub.repo_id, path, revision=hub.revision)
    return Path(found) if isinstance(found, str) else None


#: Files that mark a cached folder: a model's config or a tokenizer's files. The cache is
#: looked up by file (snapshots may hold only part of a repo, and newer huggingface_hub
#: refuses a local snapshot_download of a partly fetched repo).
FOLDER_MARKERS = ("config.json", "tokenizer_config.json", "tokenizer.json", "spiece.model", "vocab.json")


def _cached_folder(hub: HubRef, path: str) -> Path | None:
    for marker in FOLDER_MARKERS:
        found = _cached_file(hub, str(PurePosixPath(path, marker)) if path else marker)
        if found is not None:
            return found.parent
    return None


def _from_cache(hub: HubRef, filename: str | None) -> Path | None:
    path = hub.join(filename)
    if filename is not None:
        return _cached_file(hub, path)
    if path:
        found = _cached_file(hub, path)
        if found is not None:
            return found
    return _cached_folder(hub, path)


def _download(hub: HubRef, filename: str | None) -> Path:
    """Fetch a file or folder of ``hub`` into the HF cache and return its local path."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    path = hub.join(filename)
    try:
        if filename is None:
            files = HfApi().list_repo_files(hub.repo_id, revision=hub.revision)
            if path and path in files:
                filename = path  # the reference names a file
            else:
                prefix = f"{path}/" if path else ""
                # Direct children only: a repo root must not pull every subfolder's weights.
                wanted = [
                    f for f in files
                    if f.startswith(prefix) and "/" not in f[len(prefix):]
                    and any(PurePosixPath(f).match(p) for p in FOLDER_PATTERNS)
                ]
                if not wanted:
                    raise MinfmError(f"{hub}: the Hub repo {hub.repo_id} has no files under {path or '/'!r}")
                root = snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=wanted)
                return Path(root) / path if path else Path(root)
        return Path(hf_hub_download(hub.repo_id, path, revision=hub.revision))
    except MinfmError:
        raise
    except Exception as exc:  # network, auth, gated repo, missing file: all the user's to fix
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MinfmError(f"{hub}: could not download from the Hugging Face Hub ({type(exc).__name__}: {reason})") from None


def _hub_ref_or_error(ref: str) -> HubRef:
    hub = parse_hub_ref(ref)
    if hub is None:
        raise MinfmError(f"{ref}: no such file or directory (and not a Hub id of the form org/name)")
    return hub


def resolve_pretrained(ref: str, filename: str | None = None) -> Path:
    """A local file or folder for a path or ``org/name[@rev][/path]`` Hub reference.

    With ``filename``, the file of that name inside the referenced folder. Reads the HF
    cache first; downloads only when not cached and the Hub is not offline.
    """
    path = Path(ref).expanduser()
    if path.exists():
        target = path / filename if filename else path
        if not target.exists():
            raise MinfmError(f"{ref}: has no {filename}")
        return target
    hub = _hub_ref_or_error(ref)
    found = _from_cache(hub, filename)
    if found is not None:
        return found
    what = f"{hub}" + (f" ({filename})" if filename else "")
    if _offline():
        raise MinfmError(
            f"{what}: not a local path and not in the Hugging Face cache, and the Hub is offline "
            f"(HF_HUB_OFFLINE=1); {_fetch_hint(hub)}"
        )
    return _download(hub, filename)


def fetch_pretrained(ref: str, filename: str | None = None) -> Path | None:
    """Download ``ref`` into the HF cache (``minfm cache models``); None for a local path.

    Offline, nothing can be fetched: this only checks that ``ref`` is cached (the
    :func:`resolve_pretrained` error when it is not).
    """
    if is_local(ref):
        return None
    if _offline():
        return resolve_pretrained(ref, filename)
    return _download(_hub_ref_or_error(ref), filename)


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
