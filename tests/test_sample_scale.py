"""Sampling at scale: fixed batches over ranks, dummy padding, resume, .npz layout, prompt-file errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_minfm
from engine_helpers import tiny
from minfm_core.cli.main import main
from minfm_core.engine import sample as sample_mod
from minfm_core.engine.sample import plan_batches, rank_share

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
# SDE sampler (fresh noise every step) and CFG with an unconditional pass: the hardest case
# for "same images at any world size".
SDE = ["--set", 'sample.sampler={name = "ddim_sde", eta = 1.0}', "--set", 'sample.guidance={name = "cfg", scale = 3.0}']
FSDP = ["--set", 'parallel={name = "fsdp2", param_dtype = "fp32"}']


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from minfm_core.engine.train import train

    exp = tmp_path_factory.mktemp("sample") / "run"
    train(tiny(exp, "train.max_steps=2"))
    return exp


def sample_args(run: Path, out: Path, *extra: str) -> list[str]:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return ["sample", str(run), "--out", str(out), *prompts, "--set", "sample.samples_per_prompt=3",
            "--set", "sample.batch_size=2", "--npz", *SDE, *extra]


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "images").iterdir())}


def test_batches_are_fixed_and_shared_round_robin():
    batches = plan_batches(3, 3, 2)
    assert [len(b) for b in batches] == [2, 2, 2, 2, 1]
    assert sum(batches, []) == [(i, k) for i in range(3) for k in range(3)]
    assert plan_batches(3, 3, 4)[0] == batches[0] + batches[1]  # composition depends on batch_size only
    # Pending batches 0..4 over 2 ranks: 3 rounds each, rank 1 pads its last round.
    assert rank_share([0, 1, 2, 3, 4], 0, 2) == ([0, 2, 4], 3)
    assert rank_share([0, 1, 2, 3, 4], 1, 2) == ([1, 3], 3)
    assert rank_share([3], 1, 4) == ([], 1)  # nothing of its own: one dummy round
    assert rank_share([], 0, 2) == ([], 0)


@pytest.mark.slow
def test_two_processes_draw_exactly_the_images_of_one(run_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(sample_args(run_dir, one, *FSDP)) == 0
    res = run_minfm(*sample_args(run_dir, two, *FSDP), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "3 rounds" in res.stdout or "round 3/3" in res.stdout  # 5 batches on 2 ranks: one dummy round
    d1, d2 = digests(one), digests(two)
    expected = {f"{i:05d}_{k:02d}.png" for i in range(3) for k in range(3)}
    assert set(d1) == set(d2) == expected  # none missing, no extra (dummy) files
    assert d1 == d2  # byte for byte
    assert len(set(d1.values())) == 9  # no duplicates
    meta = json.loads((two / "metadata.json").read_text())
    assert [r["path"] for r in meta["images"]] == [f"images/{n}" for n in sorted(expected)]
    assert len({r["seed"] for r in meta["images"]}) == 9
    assert (one / "samples.npz").read_bytes() == (two / "samples.npz").read_bytes()


def test_interrupted_sampling_resumes(run_dir, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(sample_args(run_dir, full)) == 0

    real = sample_mod.generate
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if stopped during the third batch
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_mod, "generate", failing)
    assert main(sample_args(run_dir, cut)) == 130
    written = sorted(p.name for p in (cut / "images").iterdir())
    assert written == ["00000_00.png", "00000_01.png", "00000_02.png", "00001_00.png"]
    (cut / "images" / ".00001_01.png.tmp").write_bytes(b"half an image")  # a write cut short

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_mod, "generate", counting)
    assert main(sample_args(run_dir, cut)) == 0
    assert counted["n"] == 3  # only the three unfinished batches
    assert digests(cut) == digests(full)
    assert (cut / "samples.npz").read_bytes() == (full / "samples.npz").read_bytes()


def test_npz_is_adm_layout(run_dir, tmp_path):
    out = tmp_path / "s"
    assert main(sample_args(run_dir, out)) == 0
    with np.load(out / "samples.npz") as z:
        assert list(z.keys()) == ["arr_0"]
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (9, 16, 16, 3)
    from PIL import Image

    # Prompt-major: prompt 0's three samples, then prompt 1's, then prompt 2's.
    for j, (i, k) in enumerate((i, k) for i in range(3) for k in range(3)):
        assert np.array_equal(arr[j], np.asarray(Image.open(out / "images" / f"{i:05d}_{k:02d}.png").convert("RGB")))


@pytest.mark.parametrize("content", [None, b"", b"\n  \n", b"\xff\xfe\x00bad"])
def test_bad_prompt_file_exits_2(run_dir, tmp_path, capsys, content):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["sample", str(run_dir), "--prompt-file", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompts.txt" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sharded_sampling_from_an_exported_folder(run_dir, tmp_path):
    """2 ranks, fsdp2, weights from model/ema.safetensors (a Hub folder): same bytes as 1 process."""
    from minfm_core.checkpoint import export_for_hub

    folder = export_for_hub(run_dir, tmp_path / "exported")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(sample_args(folder, one, *FSDP)) == 0
    res = run_minfm(*sample_args(folder, two, *FSDP), "--nproc-per-node", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert digests(one) == digests(two)
    assert json.loads((two / "metadata.json").read_text())["settings"]["weights"] == "ema"


@pytest.mark.slow
def test_a_write_that_fails_on_one_rank_is_one_line_on_every_rank(run_dir, tmp_path):
    """A folder at an image name one rank writes: that rank said why, the other died in the
    barrier with a gloo traceback and "this is a bug", and the launcher exited 1."""
    out = tmp_path / "out"
    assert main(sample_args(run_dir, out, *FSDP)) == 0
    planted = out / "images" / "00000_02.png"  # batch 1 (items 2, 3 of prompt 0): the one left to draw
    planted.unlink()
    planted.mkdir()
    res = run_minfm(*sample_args(run_dir, out, *FSDP), "--nproc-per-node", "2")
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "bug" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("minfm: error:")]
    # the rank that failed names itself; the other says the same instead of a gloo traceback
    assert len(lines) == 2 and lines[0] == lines[1] and "00000_02.png: Is a directory" in lines[0], res.stderr[-3000:]


def test_a_stochastic_samplers_fresh_noise_is_not_its_starting_noise(tmp_path):
    """generate() seeded the starting noise and the sampler's generators with the same seed, so
    ddim_sde's first fresh noise was the starting noise again."""
    import torch

    from minfm_core import protocols
    from minfm_core.engine.generate import generate
    from minfm_core.engine.pipeline import build_pipeline

    seen = {}

    class Recorder(protocols.Sampler):
        def __call__(self, velocity, noise, seq_lens, *, steps, warper=None, generators=None, callback=None):
            seen["start"] = noise.clone()
            seen["fresh"] = torch.cat([torch.randn((int(n), noise.shape[1]), generator=g)
                                       for n, g in zip(seq_lens.tolist(), generators)])
            return noise

    pipe = build_pipeline(tiny(tmp_path / "run"), torch.device("cpu"))
    generate(pipe, ["a red circle", "a blue square"], sizes=[(1, 16, 16)] * 2, seeds=[0, 1], steps=2,
             sampler=Recorder())
    start, fresh = seen["start"], seen["fresh"]
    assert start.shape == fresh.shape
    n = start.shape[0] // 2  # image 0's tokens: neither its own start nor image 1's (seed 1)
    for block in (start[:n], start[n:]):
        assert not torch.isclose(fresh[:n].flatten().sort().values, block.flatten().sort().values).all()
    assert abs(float(torch.corrcoef(torch.stack([fresh.flatten(), start.flatten()]))[0, 1])) < 0.1
