"""Engines that compose registered components: training and sampling."""

from __future__ import annotations

from ..errors import MinfmError


def run_job(resolved, job: str) -> int:
    """Run ``job`` ("train" or "sample") for a resolved recipe."""
    if job == "train":
        try:
            from .train import train
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.train":
                raise
            raise MinfmError("the training engine is not part of this build yet") from None
        return train(resolved)
    if job == "sample":
        try:
            from .sample import sample_recipe
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.sample":
                raise
            raise MinfmError("the sampling engine is not part of this build yet") from None
        return sample_recipe(resolved)
    raise MinfmError(f"job: unknown job {job!r}; expected 'train' or 'sample'")
