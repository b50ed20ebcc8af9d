"""``wandb``: a Weights & Biases run (online, offline or disabled).

The run id is kept in ``<run_dir>/wandb_id.txt`` so a resumed training run continues the same
W&B run instead of starting a new one; online runs also leave their URL in ``wandb_url.txt``.
"""

from __future__ import annotations

from pathlib import Path

from minfm_core.errors import MinfmError
from minfm_core.secrets import mask_secrets_in

from .base import Logger, writing
from .configs import WandbConfig


class WandbLogger(Logger):
    def __init__(self, cfg: WandbConfig, run_dir: str, recipe: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            raise MinfmError(
                "logger 'wandb' needs the wandb package: pip install 'minfm[logging]' "
                "(or set mode = 'disabled')"
            ) from None
        self._wandb = wandb
        run_dir_path = Path(run_dir)
        run_dir_path.mkdir(parents=True, exist_ok=True)
        id_file = run_dir_path / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        with writing("wandb", id_file):
            id_file.write_text(run_id + "\n")
        settings = wandb.Settings(base_url=cfg.host) if cfg.host else None
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=cfg.run_name or run_dir_path.resolve().name,
                config=mask_secrets_in(recipe),  # an upload: the recipe's expanded ${WANDB_API_KEY} stays here
                dir=str(run_dir_path),
                mode=cfg.mode,
                id=run_id,
                resume="allow",
                settings=settings,
            )
        except Exception as exc:  # wandb's own errors (no API key, no network) are the user's to fix
            hint = "; set WANDB_API_KEY or use mode = 'offline'" if cfg.mode == "online" else ""
            raise MinfmError(f"logger 'wandb' could not start a run: {exc}{hint}") from None
        url = getattr(self.run, "url", None)
        if cfg.mode == "online" and url:
            with writing("wandb", run_dir_path / "wandb_url.txt"):
                (run_dir_path / "wandb_url.txt").write_text(url + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(self._scalars(metrics), step=step)

    def log_images(self, step: int, name: str, images: list, captions: list[str]) -> None:
        captions = list(captions) + [None] * (len(images) - len(captions))
        self.run.log({name: [self._wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def close(self) -> None:
        self.run.finish()


def build(cfg: WandbConfig, *, run_dir: str, rank: int = 0, recipe: dict | None = None) -> Logger:
    # "disabled" needs no wandb install: it is the no-op logger.
    if rank != 0 or cfg.mode == "disabled":
        return Logger()
    return WandbLogger(cfg, run_dir, recipe)
