"""The record ``minfm cache latents`` keeps beside a cache's shards (``<split>/cache.json``):
the data and VAE settings that made it.

Training from a cache reads its latents, not the images: a data or VAE setting changed since
the cache was made takes no effect until the cache is made again. The encoder compares the
record to refuse reusing stale shards; training compares it to say which settings are not used.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
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
    the record (tuples as lists), so that equal requests compare equal. Every ``p_flip`` is 0,
    a nested dataset's (a mix's sources) too: the cache is encoded unflipped
    (:func:`without_flips`), and flips are drawn when it is read."""
    settings = resolved.to_dict()
    return json.loads(json.dumps({"data": without_flips(settings.get("data")), "vae": settings["model"]["vae"]}))


def without_flips(value: Any) -> Any:
    """``value`` (a dataset config, or its table) with every ``p_flip`` at any depth set to 0:
    the field of :class:`~minfm_core.protocols.FlipConfig`, at the top or in nested dataset
    tables (a mix's sources). ``minfm cache latents`` encodes what this builds: a flip drawn
    then would be baked into every epoch that reads the cache."""
    if attrs.has(type(value)):
        changes = {}
        for a in attrs.fields(type(value)):
            old = getattr(value, a.name)
            new = _flip_off(a.name, old)
            if a.init and new is not old and not (type(new) is float and new == old):
                changes[a.alias] = new
        return attrs.evolve(value, **changes) if changes else value
    if isinstance(value, dict):
        return {k: _flip_off(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [without_flips(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    return value


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


def _flip_off(name: str, value: Any) -> Any:
    return 0.0 if name == "p_flip" and type(value) in (int, float) else without_flips(value)
