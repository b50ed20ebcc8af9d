"""``tensorboard``: scalars, images and the recipe as TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minfm_core.errors import MinfmError
from minfm_core.secrets import mask_secrets_in

from .base import Logger, writing
from .configs import TensorboardConfig


class TensorboardLogger(Logger):
    def __init__(self, cfg: TensorboardConfig, run_dir: str, recipe: dict | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError with its own text when tensorboard is absent
            raise MinfmError(
                "logger 'tensorboard' needs the tensorboard package: pip install 'minfm[logging]'"
            ) from None
        self.log_dir = Path(run_dir) / cfg.subdir
        # Its event files are written by a thread of its own, whose OSError surfaces at the
        # next call naming no file: each call names the folder.
        with writing("tensorboard", self.log_dir):
            self.writer = SummaryWriter(log_dir=str(self.log_dir))
            if recipe is not None:
                text = json.dumps(mask_secrets_in(recipe), indent=2, default=str)  # a page others may read
                self.writer.add_text("recipe", "```\n" + text + "\n```", 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with writing("tensorboard", self.log_dir):
            for key, value in self._scalars(metrics).items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def log_images(self, step: int, name: str, images: list, captions: list[str]) -> None:
        with writing("tensorboard", self.log_dir):
            for i, image in enumerate(images):
                self.writer.add_image(f"{name}/{i}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            if captions:
                self.writer.add_text(f"{name}/captions", "\n".join(f"{i}. {c}" for i, c in enumerate(captions)), step)
            self.writer.flush()

    def close(self) -> None:
        with writing("tensorboard", self.log_dir):
            self.writer.close()


def build(cfg: TensorboardConfig, *, run_dir: str, rank: int = 0, recipe: dict | None = None) -> Logger:
    return TensorboardLogger(cfg, run_dir, recipe) if rank == 0 else Logger()
