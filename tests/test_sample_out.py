"""Sampling resumes only what matches; hf:// never writes into the cache; CLI numbers have ranges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import minfm_in_process, run_minfm
from engine_helpers import tiny
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError

ARGS = ["--steps", "2", "--n", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from minfm_core.engine.train import train

    run = tmp_path_factory.mktemp("sample_out") / "run"
    train(tiny(run, "train.max_steps=1"))
    return run


def sample(run: Path, out: Path, *args: str):
    return minfm_in_process("sample", str(run), "--out", str(out), *ARGS, *args)


def images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


def one_error_line(res, *needles: str) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, res.stderr
    for n in needles:
        assert n in line, line
    return line


def test_same_request_resumes_another_is_refused_then_overwritten(run_dir, tmp_path):
    out = tmp_path / "out"
    first = sample(run_dir, out, "--prompt", "a red circle", "--prompt", "a blue square")
    assert first.returncode == 0, first.stderr
    old = images(out)
    assert sorted(old) == ["00000_00.png", "00000_01.png", "00001_00.png", "00001_01.png"]

    # The same request again: nothing left to draw, nothing changed.
    again = sample(run_dir, out, "--prompt", "a red circle", "--prompt", "a blue square")
    assert again.returncode == 0 and "1 batch, 1 already done, 0 to draw" in again.stdout
    assert f"minfm: {out} holds all 4 images: 0 drawn now, 4 already there" in again.stdout  # was "wrote 4 images"
    assert images(out) == old

    # Another prompt, another seed: refused, naming what differs; nothing touched.
    other = sample(run_dir, out, "--prompt", "a green triangle")
    one_error_line(other, f"--out {out}: holds samples of another request (different prompts)", "--overwrite")
    seeded = sample(run_dir, out, "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "7")
    one_error_line(seeded, "(different seed)")
    steps = minfm_in_process("sample", str(run_dir), "--out", str(out), "--steps", "3", "--n", "2", "--cfg", "1.5",
                      "--prompt", "a red circle", "--prompt", "a blue square")
    one_error_line(steps, "guidance_scale", "steps")
    assert images(out) == old

    # --overwrite: the stale images go first; what is left is exactly the new request's.
    new = sample(run_dir, out, "--prompt", "a green triangle", "--n", "1", "--overwrite")
    assert new.returncode == 0, new.stderr
    fresh = tmp_path / "fresh"
    assert sample(run_dir, fresh, "--prompt", "a green triangle", "--n", "1").returncode == 0
    assert images(out) == images(fresh) and sorted(images(out)) == ["00000_00.png"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["complete"] and meta["settings"]["prompts"] == ["a green triangle"]
    assert [r["prompt"] for r in meta["images"]] == ["a green triangle"]


def test_weights_trained_again_at_the_same_path_are_another_request(run_dir, tmp_path):
    """A run deleted and trained again to the same step leaves its checkpoint at the same path:
    its samples must not be mixed with the old weights' (the manifest's CRC tells them apart);
    the same checkpoint copied there again resumes."""
    import shutil

    from minfm_core.engine.train import train

    run, out, prompts = tmp_path / "run", tmp_path / "out", ("--prompt", "a red circle")
    shutil.copytree(run_dir, run)
    assert sample(run, out, *prompts).returncode == 0
    shutil.rmtree(run)
    shutil.copytree(run_dir, run)  # the same weights again (new files, new times)
    again = sample(run, out, *prompts)
    assert again.returncode == 0 and "0 to draw" in again.stdout, again.stdout + again.stderr
    shutil.rmtree(run)
    train(tiny(run, "train.max_steps=1", "run.seed=1"))  # other weights, same step, same path
    one_error_line(sample(run, out, *prompts), "holds samples of another request (different weights_content)")


def test_out_that_is_a_file_or_holds_unknown_images(run_dir, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep")
    one_error_line(sample(run_dir, f, "--prompt", "x"), f"--out: {f} is a file, not a folder")
    assert f.read_text() == "keep"

    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "00000_00.png").write_bytes(b"someone else's")
    one_error_line(sample(run_dir, foreign, "--prompt", "x"), "but no metadata.json")
    assert (foreign / "images" / "00000_00.png").read_bytes() == b"someone else's"

    site = tmp_path / "site"  # someone's folder with a page of their own
    site.mkdir()
    (site / "index.html").write_text("<p>mine</p>")
    one_error_line(sample(run_dir, site, "--prompt", "x"), "but no metadata.json")
    assert (site / "index.html").read_text() == "<p>mine</p>" and not (site / "images").exists()


def test_size_must_suit_the_model(run_dir, tmp_path):
    res = sample(run_dir, tmp_path / "o", "--prompt", "x", "--size", "15x16")
    # The recipe's own check (sample.size, which --size sets) refuses it before any model is built.
    one_error_line(res, "sample.size: height and width 15x16 must be multiples of")
    assert not (tmp_path / "o").exists()


def test_hf_source_never_writes_into_the_cache(run_dir, hub_server, tmp_path):
    env = hub_server.env(tmp_path / "hf_home")
    pushed = run_minfm("hub", "push", str(run_dir), "org/tiny", env=env)
    assert pushed.returncode == 0, pushed.stderr
    # Download first, then take stock of the cache: sampling must add nothing to it.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    first = run_minfm("sample", "hf://org/tiny", "--prompt", "a red circle", *ARGS, env=env, cwd=cwd)
    assert first.returncode == 0, first.stderr
    cache = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "hf_home").rglob("*"))
    assert not any("samples" in p for p in cache)
    assert sorted(images(cwd / "samples" / "org--tiny")) == ["00000_00.png", "00000_01.png"]
    rev = run_minfm("sample", "hf://org/tiny@main", "--prompt", "a red circle", *ARGS, env=env, cwd=cwd)
    assert rev.returncode == 0, rev.stderr
    assert (cwd / "samples" / "org--tiny@main" / "metadata.json").is_file()
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "hf_home").rglob("*")) == cache


BAD_NUMBERS = [
    (["sample", "SRC", "--n", "0"], "--n: expected a positive integer, got 0"),
    (["sample", "SRC", "--n", "two"], "--n: expected an integer, got 'two'"),
    (["sample", "SRC", "--steps", "0"], "--steps: expected a positive integer, got 0"),
    (["sample", "SRC", "--cfg", "inf"], "--cfg: expected a finite number, got inf"),
    (["sample", "SRC", "--cfg", "nan"], "--cfg: expected a finite number, got nan"),
    (["sample", "SRC", "--size", "0x0"], "--size '0x0': height and width must be positive"),
    (["sample", "SRC", "--size", "256"], "--size '256': expected HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH"),
    (["sample", "SRC", "--size", "1x2x3x4"], "--size '1x2x3x4': expected HEIGHTxWIDTH or FRAMESxHEIGHTxWIDTH"),
    (["sample", "SRC", "--size", "0x16x16"], "--size '0x16x16': frames must be in 1..1024"),
    (["sample", "SRC", "--size", "1025x16x16"], "--size '1025x16x16': frames must be in 1..1024"),
    (["sample", "SRC", "--size", "9x0x16"], "--size '9x0x16': height and width must be positive"),
    (["sample", "SRC", "--size", "20000x16"], "--size '20000x16': height and width must be at most 16383"),
    (["sample", "SRC", "--fps", "0"], "--fps: expected a positive integer, got 0"),
    (["sample", "SRC", "--fps", "61"], "--fps: expected at most 60, got 61"),
    (["sample", "SRC", "--seed", "-1"], "--seed: expected a non-negative integer, got -1"),
    (["sample", "SRC", "--seed", str(2**64)], "--seed: expected at most"),
    (["sample", "SRC", "--nproc-per-node", "0"], "--nproc-per-node: expected a positive integer, got 0"),
    (["run", "R.toml", "--nproc-per-node", "-3"], "--nproc-per-node: expected a positive integer, got -3"),
    (["run", "R.toml", "--nproc-per-node", "100000"], "--nproc-per-node: expected at most 1024"),
    (["check", "R.toml", "--world-size", "0"], "--world-size: expected a positive integer, got 0"),
    (["serve", "DIR", "--port", "70000"], "--port: expected at most 65535, got 70000"),
]


@pytest.mark.parametrize("argv,message", BAD_NUMBERS, ids=[" ".join(a[2:]) for a, _ in BAD_NUMBERS])
def test_bad_cli_numbers_exit_2_one_line(argv, message, capsys, tmp_path):
    """Refused while parsing: before the source, recipe or run dir is even looked at."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minfm: error: {message}") and "\n" not in err, err


def test_bad_cli_number_in_a_real_process(tmp_path):
    res = run_minfm("sample", str(tmp_path / "nothing"), "--cfg=-inf")  # "=": argparse reads a bare -inf as a flag
    one_error_line(res, "minfm: error: --cfg: expected a finite number, got -inf")


def test_write_npz_of_mixed_sizes_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    from PIL import Image

    from minfm_core.engine.sample import write_npz

    files = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for f, size in zip(files, (8, 8, 12)):
        Image.new("RGB", (size, size), (size, 0, 0)).save(f)
    out = tmp_path / "samples.npz"
    write_npz(out, files[:2])
    before = out.read_bytes()
    assert np.load(out)["arr_0"].shape == (2, 8, 8, 3)
    with pytest.raises(MinfmError, match=r"c\.png: is 12x12, the others 8x8; \.npz needs one size"):
        write_npz(out, files)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.png", "b.png", "c.png", "samples.npz"]


def test_a_request_that_failed_before_drawing_does_not_hold_its_out_folder(run_dir, tmp_path):
    out = tmp_path / "out"
    failed = sample(run_dir, out, "--prompt", "a red circle", "--set", "model.denoiser.d_model=64")
    one_error_line(failed, "weights do not fit the model")
    assert not out.exists()  # neither its record nor the folder it made
    ok = sample(run_dir, out, "--prompt", "a red circle")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((out / "metadata.json").read_text())["complete"]


def test_a_size_past_one_sequence_is_refused_and_overwrite_drops_the_old_gallery(run_dir, tmp_path):
    huge = sample(run_dir, tmp_path / "huge", "--prompt", "a", "--size", "16382x16382")
    one_error_line(huge, "sample.size: 1x16382x16382 is 67,092,481 tokens a sample, more than the 16,777,216")
    out = tmp_path / "out"
    assert sample(run_dir, out, "--prompt", "a red circle").returncode == 0
    assert (out / "index.html").is_file()
    # another request with --overwrite that fails before drawing: the old page would link to nothing
    failed = sample(run_dir, out, "--prompt", "a green triangle", "--overwrite", "--set", "model.denoiser.d_model=64")
    one_error_line(failed, "weights do not fit the model")
    assert sorted(p.name for p in out.iterdir()) == [".minfm.lock"]  # nor the failed request's record


def test_a_second_sampler_on_the_same_out_is_refused(run_dir, tmp_path):
    """Two samplers on one --out mixed their requests' images (and both exited 0): the second
    took the folder over while the first was still loading its model."""
    import subprocess
    import sys

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from minfm_core import runlock; runlock.acquire(sys.argv[1], what='--out');"
         "print('held', flush=True); time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = sample(run_dir, out, "--prompt", "a red circle")
        one_error_line(res, f"{out}: in use by another run (pid {holder.pid}", "choose another --out")
        assert not (out / "images").exists()
    finally:
        holder.kill()
        holder.wait()
    assert sample(run_dir, out, "--prompt", "a red circle").returncode == 0  # free once the holder is gone


def test_overwrite_clears_three_digit_names_and_cut_writes_of_the_out_folder(tmp_path):
    """--n 100 writes 00000_100.png, which the two-digit pattern missed: --overwrite left it and
    the new request took it as drawn. An npz cut short by a kill stayed for good (gigabytes)."""
    from minfm_core.engine.sample import image_name, prepare_out

    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "metadata.json").write_text(json.dumps({"settings": {"seed": 0}, "complete": True, "images": []}))
    for name in (image_name(0, 100, "png"), image_name(100_000, 0, "png"), ".00000_100.png.1a2b3c.tmp"):
        (out / "images" / name).write_bytes(b"old")
    for name in (".samples.npz.0123456789ab.tmp", ".metadata.json.0123456789ab.tmp"):
        (out / name).write_bytes(b"cut")
    (out / "mine.txt").write_text("not ours")
    with pytest.raises(MinfmError, match="holds samples of another request"):
        prepare_out(out, {"seed": 1}, overwrite=False, flag="--out")
    prepare_out(out, {"seed": 1}, overwrite=True, flag="--out")
    assert list((out / "images").iterdir()) == []
    assert sorted(p.name for p in out.iterdir()) == ["images", "metadata.json", "mine.txt"]


def test_a_huge_metadata_json_is_refused_unread(tmp_path):
    from minfm_core.engine.sample import MAX_METADATA_BYTES, prepare_out

    out = tmp_path / "out"
    out.mkdir()
    with open(out / "metadata.json", "wb") as f:  # sparse: no disk used
        f.truncate(MAX_METADATA_BYTES + 1)
    with pytest.raises(MinfmError, match="metadata.json is not a minFM sampling record"):  # unread: 1.6 GB it took
        prepare_out(out, {"seed": 1}, overwrite=False, flag="--out")


def test_a_request_whose_own_record_passes_the_read_limit_still_resumes(run_dir, tmp_path, monkeypatch):
    """The read limit is the larger of MAX_METADATA_BYTES and what the request itself writes:
    a finished request near the million-image cap wrote more than the fixed limit, then read
    its own record back as "not a minFM sampling record" (and --overwrite would delete it all)."""
    from minfm_core.engine import sample as sample_mod

    out = tmp_path / "out"
    assert sample(run_dir, out, "--prompt", "a red circle", "--prompt", "a blue square").returncode == 0
    size = (out / "metadata.json").stat().st_size
    monkeypatch.setattr(sample_mod, "MAX_METADATA_BYTES", size // 4)  # as if 4x the cap's worth
    again = sample(run_dir, out, "--prompt", "a red circle", "--prompt", "a blue square")
    assert again.returncode == 0 and "0 to draw" in again.stdout, again.stdout + again.stderr


def test_what_is_planted_at_an_image_name_is_drawn_again(run_dir, tmp_path):
    """Any existing path counted as a finished image: a link to another file, an empty file."""
    out = tmp_path / "out"
    assert sample(run_dir, out, "--prompt", "a red circle").returncode == 0
    good = images(out)
    (out / "images" / "00000_00.png").unlink()
    (out / "images" / "00000_00.png").symlink_to(run_dir / "recipe.toml")
    (out / "images" / "00000_01.png").write_bytes(b"")
    res = sample(run_dir, out, "--prompt", "a red circle")
    assert res.returncode == 0 and "1 to draw" in res.stdout, res.stdout + res.stderr
    assert not (out / "images" / "00000_00.png").is_symlink() and images(out) == good


def test_a_training_gallery_cell_is_redrawn_by_sampling_its_checkpoint(tmp_path):
    """The gallery numbered its seeds over its own list (at most 4 per prompt), `minfm sample`
    as seed + prompt * samples_per_prompt + k: with 5 per prompt every prompt after the first
    got other seeds, so no gallery picture could be drawn again from its checkpoint."""
    from PIL import Image

    from minfm_core.engine.train import train

    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=1", "train.sample_every=1", "sample.samples_per_prompt=5", "sample.steps=2"))
    assert main(["sample", str(run), "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    drawn = [r for r in meta["images"] if r["sample"] < 4]  # the gallery draws the first 4 of each prompt
    assert len(drawn) == 8 and {r["seed"] for r in drawn} == {0, 1, 2, 3, 5, 6, 7, 8}
    gallery = np.asarray(Image.open(run / "samples" / "step_00000001" / "ema.png").convert("RGB")).astype(int)
    for cell, r in enumerate(drawn):
        x, y = 2 + (cell % 8) * 18, 2 + (cell // 8) * 18  # 16x16 cells, 2-pixel padding, 8 to a row
        image = np.asarray(Image.open(tmp_path / "out" / r["path"]).convert("RGB")).astype(int)
        assert np.abs(image - gallery[y:y + 16, x:x + 16]).max() == 0, r


@pytest.mark.parametrize("flag, override, key", [
    (("--steps", "1"), "sample.steps=-1", "--steps"),
    ((), 'sample.out_dir="/dev/null"', "--out"),
    ((), 'sample.source="elsewhere"', "SRC"),
])
def test_a_set_that_the_commands_own_argument_would_override_is_refused(run_dir, tmp_path, flag, override, key):
    """`--steps 1 --set sample.steps=-1` drew with 1 step, the -1 never checked; `--set
    sample.out_dir=/dev/null` wrote to the default folder (exit 0)."""
    res = sample(run_dir, tmp_path / "o", *flag, "--set", override)
    name = override.partition("=")[0]
    assert one_error_line(res) == f"minfm: error: --set {name}: minfm sample takes it from {key}; give it there"
    assert not (tmp_path / "o").exists()


def test_without_prompts_it_draws_the_sample_jobs_prompts_and_file(run_dir, tmp_path):
    """A `--set sample.prompt_file` was never read where the recipe had sample.prompts (a
    missing file: exit 0); `minfm sample` draws what job = "sample" draws: both."""
    res = minfm_in_process("sample", str(run_dir), "--out", str(tmp_path / "o"), "--steps", "1", "--n", "1",
                           "--size", "16x16", "--set", 'sample.prompt_file="/does/not/exist"')
    assert one_error_line(res, "/does/not/exist")
    (tmp_path / "p.txt").write_text("from the file\n")
    res = minfm_in_process("sample", str(run_dir), "--out", str(tmp_path / "o"), "--steps", "1", "--n", "1",
                           "--size", "16x16", "--set", 'sample.prompts=["a"]', "--set",
                           f"sample.prompt_file={json.dumps(str(tmp_path / 'p.txt'))}")
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "o" / "metadata.json").read_text())
    assert sorted(r["prompt"] for r in meta["images"]) == ["a", "from the file"]
