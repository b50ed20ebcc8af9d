"""The launcher's environment (torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), read and checked.

One reader for every command, so that a malformed value is refused the same way
everywhere, before any work starts: ``minfm: error: WORLD_SIZE='two' (environment):
expected an integer from 1 to 1048576``, exit code 2, rather than a traceback from ``int()``
or a process group that waits for ranks that never come. Torch-free: the CLI reads it first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import MinfmError

# Far above any real launch; a value beyond it is a typo, not a cluster.
MAX_WORLD_SIZE = 1 << 20


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def _read(name: str, default: int, low: int, high: int, what: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    text = raw.strip()
    # (a number of more digits than the bound is out of range: int() of 5,000 digits raises)
    value = int(text) if text.isascii() and text.isdigit() and len(text.lstrip("0")) <= len(str(high)) else None
    if value is None or not low <= value <= high:
        raise MinfmError(f"{name}={raw!r} (environment): expected {what}")
    return value


def world_size_from_env() -> int:
    """``WORLD_SIZE`` (1 where unset)."""
    return _read("WORLD_SIZE", 1, 1, MAX_WORLD_SIZE, f"an integer from 1 to {MAX_WORLD_SIZE}")


def launch_env() -> LaunchEnv:
    """This process's place in the run; a process started without a launcher is rank 0 of 1."""
    world = world_size_from_env()
    rank = _read("RANK", 0, 0, world - 1, f"an integer from 0 to WORLD_SIZE - 1 = {world - 1}")
    local_rank = _read("LOCAL_RANK", 0, 0, world - 1, f"an integer from 0 to WORLD_SIZE - 1 = {world - 1}")
    return LaunchEnv(rank, world, local_rank)


def is_multi_process() -> bool:
    """Whether this process is one of several; False where ``WORLD_SIZE`` is malformed (reported elsewhere)."""
    try:
        return world_size_from_env() > 1
    except MinfmError:
        return False
