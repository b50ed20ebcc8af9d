"""A tiny trained run, made once per session and copied per test, for checkpoint tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine_helpers import tiny

RUN_STEPS = ("train.max_steps=4", "train.ckpt_every=2", "train.keep_last=0")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A 4-step tiny run with checkpoints at steps 2 and 4 (never modified: copy it)."""
    from minfm_core.engine.train import train

    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny(run, *RUN_STEPS))
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def rewrite_manifest(ckpt: Path, edit) -> None:
    """Apply ``edit(manifest_dict)`` and write it back (to forge a manifest that 'verifies')."""
    path = ckpt / "manifest.json"
    data = json.loads(path.read_text())
    from minfm_core.checkpoint_format import SELF_CRC, _self_crc

    edit(data)
    data[SELF_CRC] = _self_crc(data)  # a forger recomputes the manifest's own checksum too
    path.write_text(json.dumps(data))


def refresh_record(ckpt: Path, name: str) -> None:
    """Make the manifest's size and checksum of ``name`` match the file as it is now."""
    from minfm_core.checkpoint_format import file_record

    rewrite_manifest(ckpt, lambda m: m["files"].__setitem__(name, file_record(ckpt / name)))
