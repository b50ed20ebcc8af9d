"""Helpers for engine tests: tiny recipes resolved in-process, trainers on a world of one."""

from __future__ import annotations

import json
from pathlib import Path

from minfm_core.recipe import load_recipe

TINY = Path(__file__).resolve().parent / "recipes" / "tiny.toml"


def tiny(exp_dir: Path, *overrides: str):
    return load_recipe(TINY, [f"run.exp_dir={json.dumps(str(exp_dir))}", *overrides])


def read_metrics(exp_dir: Path) -> list[dict]:
    path = Path(exp_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(exp_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(exp_dir) if "loss" in m]
