"""``console`` and ``jsonl`` loggers: what they print and write, rank-0 only, resume-safe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minfm_core.config import structure
from minfm_core.registry import get_registry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make(name, run_dir, rank=0, **kw):
    comp = get_registry().get("logger", name)
    return comp.build(structure(kw, comp.config), run_dir=str(run_dir), rank=rank, recipe={"job": "train"})


def test_console_line_has_progress_metrics_and_eta(tmp_path, capsys):
    log = make("console", tmp_path)
    log.set_total(200)
    base = {"lr": 3e-4, "grad_norm": 0.8512, "tokens_per_sec": 12345.0, "mfu": 0.123}
    log.log(0, {"loss": 0.9, **base})
    line0 = capsys.readouterr().out
    assert line0.startswith("step 0/200 [--------------------] 0%") and "loss 0.9000" in line0
    log.log(50, {"loss": torch.tensor(0.41234), **base, "val_loss": 0.5})
    line = capsys.readouterr().out.strip()
    assert "\r" not in line and line.count("\n") == 0
    assert line.startswith("step 50/200 [#####---------------] 25%")
    for part in ("loss 0.4123", "lr 3.00e-04", "gnorm 0.851", "12.35k tok/s", "MFU 12.3%", "val_loss 0.5"):
        assert part in line, part
    assert "<" in line.split(" | ")[-1]  # elapsed<eta


def test_console_takes_total_steps_from_metrics_and_shows_nan(tmp_path, capsys):
    log = make("console", tmp_path, stream="stderr", bar_width=0)
    log.log(3, {"loss": float("nan"), "total_steps": 10})
    err = capsys.readouterr().err
    assert err.startswith("step 3/10 30%") and "loss nan" in err


def test_other_ranks_write_nothing(tmp_path, capsys):
    for name in ("console", "jsonl"):
        log = make(name, tmp_path, rank=1)
        log.log(1, {"loss": 1.0})
        log.close()
    assert capsys.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []


def test_jsonl_lines_and_loss_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = make("jsonl", tmp_path, plot_every=10)
    for step in range(1, 31):
        log.log(step, {"loss": 1.0 / step, "lr": 1e-3, "total_steps": 30})
        if step == 10:
            assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC  # redrawn while training
        if step % 10 == 0:
            log.log(step, {"val_loss": 2.0 / step})
    log.log(31, {"loss": float("nan")})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 34
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 1.0 and rows[0]["lr"] == 1e-3 and "time" in rows[0]
    assert "total_steps" not in rows[0]
    assert rows[10] == {"step": 10, "time": rows[10]["time"], "val_loss": 0.2}
    assert math.isnan(rows[-1]["loss"])
    (tmp_path / "loss.png").unlink()
    log.close()
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    from PIL import Image

    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == (700, 400)


def test_jsonl_resume_drops_lines_from_the_interrupted_run(tmp_path):
    first = make("jsonl", tmp_path, plot_every=0)
    for step in range(1, 11):
        first.log(step, {"loss": float(step)})
    first.close()  # the checkpoint was at step 6; steps 7..10 are replayed after resuming
    again = make("jsonl", tmp_path, plot_every=0)
    for step in range(7, 13):
        again.log(step, {"loss": 100.0 + step})
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [float(s) for s in range(1, 7)] + [100.0 + s for s in range(7, 13)]


def test_jsonl_resume_drops_lines_no_logger_wrote(tmp_path):
    # a run folder from elsewhere (a download, a hand edit): junk lines went through
    # row.get / row["step"] and ended the resumed run in a traceback
    junk = [b"[1]", b'"text"', b"{}", b'{"step": "3"}', b'{"step": true}', b"\xff\xfe{", b"[" * 70000,
            b'{"step": 2, "loss": 2.0}']
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join([b'{"step": 1, "loss": 1.0}', *junk]) + b"\n")
    (tmp_path / "evil").write_text("keep")
    again = make("jsonl", tmp_path, plot_every=1)
    (tmp_path / ".metrics.jsonl.tmp").symlink_to(tmp_path / "evil")  # the old fixed temp names
    (tmp_path / "loss.tmp.png").symlink_to(tmp_path / "evil")
    again.log(3, {"loss": 3.0})
    again.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert (tmp_path / "evil").read_text() == "keep" and (tmp_path / "loss.png").stat().st_size > 0


def test_a_full_disk_names_the_logger_and_its_file(tmp_path, monkeypatch):
    """A write or flush fails with an OSError naming no file: the run said only
    ``minfm: error: No space left on device``."""
    import contextlib
    import sys

    from minfm_core.errors import MinfmError

    full = open("/dev/full", "w", encoding="utf-8")  # writes to it fail as on a full disk
    try:
        log = make("jsonl", tmp_path, plot_every=0)
        log.log(1, {"loss": 1.0})
        log._file.close()
        log._file = full  # the disk fills up
        with pytest.raises(MinfmError) as info:
            log.log(2, {"loss": 0.5})
        assert str(info.value) == f"logger 'jsonl': {tmp_path / 'metrics.jsonl'}: cannot write: No space left on device"
        log._file = None
        monkeypatch.setattr(sys, "stdout", full)  # stdout sent to a file on the full disk
        with pytest.raises(MinfmError, match=r"^logger 'console': stdout: cannot write: No space left on device$"):
            make("console", tmp_path).log(1, {"loss": 1.0})
    finally:
        with contextlib.suppress(OSError):  # what is still buffered cannot be flushed either
            full.close()
