"""Checkpoint sources: a local path, or ``scheme://...`` resolved by a registered plugin.

The ``hub`` plugin registers ``hf`` (``hf://org/name[@rev]``); a third party could add
``s3`` the same way: ``register("s3", "my_pkg.s3:resolve")`` in ``register_sources``,
where ``resolve(uri: str, *, training_state: bool = False) -> str | Path`` returns a local
folder or file.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MinfmError
from .registry import get_registry


def resolve_source(src: str, *, training_state: bool = False) -> Path:
    """A local path for ``src`` (downloading through the scheme's resolver if needed).

    ``training_state=True`` asks remote sources for the full DCP training state too
    (optimizer included; only needed to resume training), not just the weights.
    """
    if "://" in src:
        scheme = src.split("://", 1)[0]
        comp = get_registry().get("source", scheme, path=f"source {src!r}")
        resolver = comp.load_factory()
        return Path(resolver(src, training_state=True) if training_state else resolver(src))
    path = Path(src).expanduser()
    if not path.exists():
        raise MinfmError(f"{src}: no such file or directory")
    return path
