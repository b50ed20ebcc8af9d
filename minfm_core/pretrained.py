"""Where pretrained weights come from: a local path, or a Hub id in the local HF cache.

Shared by every component that loads pretrained weights (T5, CLIP, VAE, FLUX).
Offline and not cached gives one clear error naming the id and how to fetch it.
(The Hub-cache half is being completed; local paths work now.)
"""

from __future__ import annotations

from pathlib import Path

from .errors import MinfmError


def resolve_pretrained(ref: str, filename: str | None = None) -> Path:
    """A local folder (or, with ``filename``, a file in it) for a path or ``org/name`` Hub id."""
    path = Path(ref).expanduser()
    if path.exists():
        return path / filename if filename and path.is_dir() else path
    raise MinfmError(f"{ref}: not a local path, and Hub-cache resolution is not available yet")
