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

    @property
    def run_outputs(self) -> tuple[str, ...]:
        """What it writes in the run folder (probed before the run starts: runlock.run_outputs)."""
        return JSONL_FILES


#: The built-in loggers' files in the run folder (a trailing "/": a folder).
METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"
JSONL_FILES = (METRICS_FILE, PLOT_FILE)
WANDB_FILES = ("wandb/", "wandb_id.txt", "wandb_url.txt")


def _taken() -> dict[str, str]:
    """Names in the run folder that belong to the run itself or to another logger."""
    from minfm_core.runlock import RUN_DIR_NAMES

    return {n.rstrip("/"): "the run's own" for n in RUN_DIR_NAMES} | {
        n.rstrip("/"): f"logger {who!r}'s" for who, names in (("jsonl", JSONL_FILES), ("wandb", WANDB_FILES))
        for n in names}


def _inside_run_dir(name: str, value: str) -> None:
    path = PurePosixPath(value)
    if not value or "\\" in value or path.is_absolute() or value.startswith("~") or ".." in path.parts:
        raise ValueError(f"{name}: {value!r} is not a folder inside the run directory (a relative path without '..')")
    # plain segments: "a//b", "./a" and "a/" name a folder another way; "." segments and hidden
    # names are where the run keeps its lock, probes and temporary files
    segments = value.split("/")
    if any(not seg.strip() or seg != seg.strip() or seg.startswith(".") or not seg.isprintable() for seg in segments):
        raise ValueError(f"{name}: {value!r} is not a plain folder path inside the run directory "
                         "(names separated by single '/', none blank, starting with '.', with a space at "
                         "either end or holding a control character)")
    owner = _taken().get(segments[0])
    if owner is not None:
        raise ValueError(f"{name}: {value!r} would write into {segments[0]!r}, {owner} file or folder "
                         "in the run directory; choose another name")


@config
class TensorboardConfig:
    """TensorBoard event files under <run_dir>/<subdir> (needs the 'logging' extra)."""

    subdir: str = field("tensorboard", doc="folder inside the run directory for the event files: plain names "
                        "separated by '/', not one of the run's own (recipe.toml, checkpoints, samples, ...)",
                        validator=lambda _, a, v: _inside_run_dir(a.name, v))

    @property
    def run_outputs(self) -> tuple[str, ...]:
        return (self.subdir.rstrip("/") + "/",)


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

    @property
    def run_outputs(self) -> tuple[str, ...]:
        return () if self.mode == "disabled" else WANDB_FILES
