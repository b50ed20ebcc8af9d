"""What every logger shares: rank-0-only writing and plain-float metrics.

A logger is built as ``factory(cfg, *, run_dir, rank=0, recipe=None)`` and has
``log(step, metrics)``, ``log_images(step, name, images, captions)``, ``set_total(n)`` and
``close()``. The trainer logs these metric names (others pass through as they are):
``loss``, ``lr``, ``grad_norm``, ``tokens_per_sec``, ``mfu`` (a fraction of peak), and
``total_steps`` (not a metric: it tells progress displays the planned length).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from minfm_core import protocols
from minfm_core.errors import MinfmError


class Logger(protocols.Logger):
    """The no-op logger: what ranks other than 0 get, and the base of the real ones."""

    total_steps: int | None = None

    def set_total(self, n: int) -> None:
        self.total_steps = int(n)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_images(self, step: int, name: str, images: list, captions: list[str]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scalars(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Plain floats (tensors and numpy scalars unwrapped); ``total_steps`` is taken out."""
        out = {}
        for key, value in metrics.items():
            if hasattr(value, "item"):
                value = value.item()
            if key == "total_steps":
                self.set_total(value)
                continue
            out[key] = value if isinstance(value, int) and not isinstance(value, bool) else float(value)
        return out


def is_finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@contextlib.contextmanager
def writing(logger: str, where: object) -> Iterator[None]:
    """A write that fails inside the block (a full disk, a quota) is one MinfmError naming the
    logger and the file or folder: the OSError of a write or flush names neither, and the run
    stopped with ``minfm: error: No space left on device``. A broken pipe stays what it is
    (``minfm ... | head``: the CLI treats it as the reader going away)."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise MinfmError(f"logger {logger!r}: {where}: cannot write: {exc.strerror or exc}") from None
