"""Built-in plugin 'loggers': ``console``, ``jsonl``, ``tensorboard`` and ``wandb``.

A logger factory is ``factory(cfg, *, run_dir, rank=0, recipe=None)``; only rank 0 writes.
The interface and the metric names the trainer uses are in ``base.py``.
"""

from minfm_core import hookimpl

from .configs import ConsoleConfig, JsonlConfig, TensorboardConfig, WandbConfig


@hookimpl
def register_loggers(register):
    register("console", "minfm_plugins.loggers.console:build", ConsoleConfig)
    register("jsonl", "minfm_plugins.loggers.jsonl:build", JsonlConfig)
    register("tensorboard", "minfm_plugins.loggers.tensorboard_logger:build", TensorboardConfig)
    register("wandb", "minfm_plugins.loggers.wandb_logger:build", WandbConfig)
