"""`minfm balance simulate`: traces with video clips next to images, checked numbers."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from minfm_plugins.knapformer import simulate

from minfm_core.cli.main import main

QUICKSTART = str(ROOT / "recipes" / "quickstart.toml")


def test_video_trace_has_clips_next_to_images():
    """Every step has clips (longer than any image: 256-1024 px is at most 4,608 tokens)
    and images, on the same ranks too."""
    for step in simulate.synthetic("video", 8, steps=3):
        lens = [v for r in step for v in r]
        assert max(lens) > 4608 and min(lens) <= 4608
        assert any(max(r) > 4608 and min(r) <= 4608 for r in step)


def test_simulate_video_and_long_tail(capsys):
    for name in ("video", "long_tail", "near_balanced"):
        assert main(["balance", "simulate", "--synthetic", name, "--world-size", "8", "--bags", "g1n8",
                     "--bags", "g1n2+g2n1+g4n1", "--steps", "1"]) == 0
        out = capsys.readouterr().out
        assert "per GPU" in out and ">= moved" in out and "g1n2+g2n1+g4n1" in out


def test_recipe_samples_become_clips(tmp_path, capsys):
    """--clips 1: every sample is a clip of its own picture size, so every length grows."""
    traces = {}
    for share in ("0", "1"):
        out = tmp_path / f"t{share}.json"
        assert main(["balance", "simulate", QUICKSTART, "--world-size", "2", "--bags", "g1n2", "--steps", "1",
                     "--batch-size", "3", "--clips", share, "--clip-frames", "3", "--trace-out", str(out)]) == 0
        traces[share] = json.loads(out.read_text())
    capsys.readouterr()
    plain = [v for r in traces["0"][0] for v in r]
    clips = [v for r in traces["1"][0] for v in r]
    assert len(plain) == len(clips) == 6
    assert all(c > p for c, p in zip(clips, plain))


@pytest.mark.parametrize(
    "args,message",
    [(["--synthetic", "video", "--world-size", "0"], "--world-size: expected a positive integer, got 0"),
     (["--synthetic", "video", "--bags", "g1n2", "--steps", "0"], "--steps: expected a positive integer, got 0"),
     (["--synthetic", "video", "--bags", "g1n2", "--tolerance", "-1"], "--tolerance: expected a number >= 0.0, got -1"),
     (["--synthetic", "video", "--bags", "g1n2", "--clips", "0.5"], "--clips mixes clips into a RECIPE"),
     ([QUICKSTART, "--bags", "g1n2", "--clips", "1.5"], "--clips: expected a number <= 1.0, got 1.5"),
     ([QUICKSTART, "--bags", "g1n2", "--clips", "0.5", "--clip-frames", "0"], "--clip-frames: expected a positive integer, got 0"),
     ([QUICKSTART, "--bags", "g1n2", "--text-range", "9", "3"], "--text-range: MAX 3 is below MIN 9")],
)
def test_numbers_are_checked(args, message, capsys):
    assert main(["balance", "simulate", *args]) == 2
    assert message in capsys.readouterr().err
