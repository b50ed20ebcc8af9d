"""Engines that compose registered components: training and sampling."""

from __future__ import annotations

from ..errors import MinfmError


def run_job(resolved, job: str) -> int:
    """Run ``job`` ("train" or "sample") for a resolved recipe."""
    if job == "train":
        from .train import train

        return train(resolved)
    if job == "sample":
        from .sample import sample_recipe

        return sample_recipe(resolved)
    raise MinfmError(f"job: unknown job {job!r}; expected 'train' or 'sample'")
