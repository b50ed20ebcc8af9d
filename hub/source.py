"""The ``hf`` source resolver, registered by the hub plugin for ``hf://org/name[@rev]``."""

from __future__ import annotations

from pathlib import Path

from .pretrained import resolve_pretrained_file
from .pull import pull
from .uri import parse_hf_uri


def resolve_hf_uri(uri: str, *, training_state: bool = False, subpath: str | None = None) -> Path:
    """``hf://org/name[@rev]`` -> a local folder: the minFM repo pulled (see
    :func:`minfm_hub.pull.pull`), with its training state when ``training_state``.

    With ``subpath``, only that file or folder ("" = the root) of any Hub repo, as
    pretrained weights are fetched (see :mod:`minfm_hub.pretrained`).
    """
    ref = parse_hf_uri(uri)
    if subpath is not None:
        return resolve_pretrained_file(ref, subpath)
    return pull(ref, training_state=training_state).path
