"""Configs of the built-in loggers (no torch here: plugin loading stays fast)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Literal

from minfm_core.config import config, field
from minfm_core.validators import EVERY, Range


@config
class ConsoleConfig:
    """One plain-text progress line per log call: step, loss, lr, grad-norm, tokens/s, MFU, ETA."""

    stream: Literal["stdout", "stderr"] = field("stdout", doc="where the lines go")
    bar_width: int = field(20, doc="characters of the text progress bar (0 hides it)", validator=Range(0, 1000))


@config
class JsonlConfig:
    """Appends each log call to <run_dir>/metrics.jsonl and draws <run_dir>/loss.png."""

    plot_every: int = field(
        50, doc="redraw loss.png every this many log calls (0: only when the run closes)", validator=EVERY
    )


def _inside_run_dir(name: str, value: str) -> None:
    path = PurePosixPath(value)
    if not value or "\\" in value or path.is_absolute() or value.startswith("~") or ".." in path.parts:
        raise ValueError(f"{name}: {value!r} is not a folder inside the run directory (a relative path without '..')")


@config
class TensorboardConfig:
    """TensorBoard event files under <run_dir>/<subdir> (needs the 'logging' extra)."""

    subdir: str = field("tensorboard", doc="folder inside the run directory for the event files",
                        validator=lambda _, a, v: _inside_run_dir(a.name, v))


@config
class WandbConfig:
    """Weights & Biases run (needs the 'logging' extra; online mode needs WANDB_API_KEY)."""

    mode: Literal["online", "offline", "disabled"] = field(
        "online", doc="'offline' writes locally for a later 'wandb sync'"
    )
    project: str = field("minfm", doc="W&B project")
    # Not "name": in a recipe table that key picks the component.
    run_name: str = field("", doc="W&B run name (default: the run directory's name)")
    entity: str = field("", doc="W&B user or team (default: the account's default)")
    host: str = field("", doc="W&B server URL for self-hosted instances (default: the public service)")
