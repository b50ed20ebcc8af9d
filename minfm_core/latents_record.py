"""The record ``minfm cache latents`` keeps beside a cache's shards (``<split>/cache.json``):
the data and VAE settings that made it.

Training from a cache reads its latents, not the images: a data or VAE setting changed since
the cache was made takes no effect until the cache is made again. The encoder compares the
record to refuse reusing stale shards; training compares it to say which settings are not used.
"""

from __future__ import annotations

import json
from pathlib import Path

from .jsonio import read_json_file

RECORD = "cache.json"
#: A record holds a recipe's data and VAE tables: small (a mix of many sources stays far below).
MAX_RECORD_BYTES = 1 << 24
#: Settings that say whether and where a cache is read, or (p_flip) act when it is read: not what it holds.
READ_SIDE = frozenset({"use_cached_latents", "latents_dir", "p_flip"})


def split_index(latents_dir: Path, split: str) -> Path | None:
    """The ``index.json`` a run reads ``split`` from: ``<dir>/<split>/index.json`` (what
    ``minfm cache latents --split`` writes), else ``<dir>/index.json`` (one cache for every
    split); None when neither is a file."""
    for index in (latents_dir / split / "index.json", latents_dir / "index.json"):
        if index.is_file():
            return index
    return None


def cache_request(resolved) -> dict:
    """The settings a cache of ``resolved``'s dataset is made from, as they read back from
    the record (tuples as lists), so that equal requests compare equal."""
    settings = resolved.to_dict()
    return json.loads(json.dumps({"data": settings.get("data"), "vae": settings["model"]["vae"]}))


def read_record(folder: Path, what: str) -> object:
    """``folder``'s record as parsed JSON (its shape is the caller's to check)."""
    return read_json_file(folder / RECORD, f"{what}: {folder / RECORD}", MAX_RECORD_BYTES)


def changed_settings(resolved, folder: Path) -> list[str]:
    """The recipe paths (``data.sizes``, ``model.vae.name``) whose values differ from those the
    cache in ``folder`` was made with; [] when it keeps no record (a hand-made cache)."""
    if not (folder / RECORD).is_file():
        return []
    kept = read_record(folder, "data.latents_dir")
    old = kept.get("request") if isinstance(kept, dict) else None
    new = cache_request(resolved)
    changed = []
    for key, prefix in (("data", "data"), ("vae", "model.vae")):
        was = old.get(key) if isinstance(old, dict) else None
        was = was if isinstance(was, dict) else {}
        now = new[key] or {}
        changed += [f"{prefix}.{name}" for name in sorted(set(was) | set(now))
                    if name not in READ_SIDE and was.get(name) != now.get(name)]
    return changed
