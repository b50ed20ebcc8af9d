"""Checkpoint sources: a local path, or ``scheme://...`` resolved by a registered plugin.

The ``hub`` plugin registers ``hf`` (``hf://org/name[@rev]``); a third party could add
``s3`` the same way: ``register("s3", "my_pkg.s3:resolve")`` in ``register_sources``,
where ``resolve(uri: str, *, training_state: bool = False, subpath: str | None = None)
-> str | Path`` returns a local folder or file (:class:`minfm_core.protocols.Source`).
Pretrained references (``org/name/path`` in a recipe) reach the ``hf`` source this way too,
with ``subpath`` (see :mod:`minfm_core.pretrained`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MinfmError
from .registry import get_registry


def resolve_source(src: str, *, training_state: bool = False, subpath: str | None = None) -> Path:
    """A local path for ``src`` (downloading through the scheme's resolver if needed).

    ``training_state=True`` asks remote sources for the full DCP training state too
    (optimizer included; only needed to resume training), not just the weights.
    ``subpath`` asks for one file or folder of the source ("" for its root) instead of a
    checkpoint, as pretrained weights are fetched.
    """
    if "://" in src:
        scheme = src.split("://", 1)[0]
        comp = get_registry().get("source", scheme, path=f"source {src!r}")
        resolver = comp.load_factory()
        kwargs: dict = {}  # only what is asked, so that the resolver's defaults stay in force
        if training_state:
            kwargs["training_state"] = True
        if subpath is not None:
            kwargs["subpath"] = subpath
        return Path(resolver(src, **kwargs))
    path = Path(os.path.expanduser(src))
    if not path.exists():
        raise MinfmError(f"{src}: no such file or directory")
    return path
