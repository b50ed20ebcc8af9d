"""In-training FID: logged every N steps, equal to `minfm eval` on the same samples; bad settings exit 2."""

from __future__ import annotations

import json
import math

import pytest

from conftest import minfm_in_process, run_minfm
from engine_helpers import TINY, read_metrics, tiny
from minfm_core import hookimpl
from minfm_core.cli.main import main
from minfm_core.recipe.checks import job_checks
from minfm_core.plugins import plugin
from minfm_core.engine.fid import val_item
from minfm_core.engine.train import train
from minfm_plugins.eval.evaluate import evaluate
from minfm_core.recipe import load_recipe
from eval_helpers import TinyExtractor, images, save_npz

EXTRACTOR = 'train.fid_extractor="eval_helpers:make_extractor"'


def test_fid_is_logged_and_equals_minfm_eval_of_the_same_samples(tmp_path):
    ref = save_npz(tmp_path / "ref.npz", images(12, seed=1, size=16))
    run = tmp_path / "run"
    recipe = tiny(run, "train.fid_every=3", "train.fid_num_samples=6", f"train.fid_ref={json.dumps(ref)}", EXTRACTOR,
                  "sample.batch_size=8")
    val = recipe.build("data", split="val")
    prompts = [val[val_item(g, 6, len(val))]["prompt"] for g in range(6)]
    train(recipe)
    fids = [(m["step"], m["fid"]) for m in read_metrics(run) if "fid" in m]
    assert [step for step, _ in fids] == [3, 6]
    assert all(math.isfinite(f) and f > 0 for _, f in fids)
    assert fids[0][1] != fids[1][1]  # the EMA moved between the two

    # The same prompts and seeds through the sampling CLI, scored by `minfm eval`'s code.
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "samples"
    assert main(["sample", str(run), "--prompt-file", str(tmp_path / "prompts.txt"), "--n", "1", "--npz",
                 "--out", str(out)]) == 0
    m = evaluate(out / "samples.npz", ref, extractor=TinyExtractor(), device="cpu", log=lambda _: None)
    assert m["num_samples"] == 6
    assert m["fid"] == pytest.approx(fids[-1][1], rel=1e-6)


def test_fid_without_reference_is_a_recipe_error():
    with pytest.raises(Exception, match=r"train.fid_ref: train.fid_every > 0 needs reference images"):
        load_recipe(TINY, ["train.fid_every=5"])


def test_missing_reference_exits_2_before_training(tmp_path):
    res = minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'run'))}",
                           "--set", "train.fid_every=2", "--set", f"train.fid_ref={json.dumps(str(tmp_path / 'nope.npz'))}",
                           "--set", EXTRACTOR)
    assert res.returncode == 2, res.stderr
    assert "train.fid_ref:" in res.stderr and "nope.npz: no such file or folder" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_log_the_fid_of_one(tmp_path):
    """Prompts and reference batches split over ranks, features gathered: the same numbers
    (two FID steps: the reference is featurised once, on every rank)."""
    import os

    from conftest import ROOT

    ref = save_npz(tmp_path / "ref.npz", images(12, seed=1, size=16))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    fid = {}
    for nproc in (1, 2):
        exp = tmp_path / f"n{nproc}"
        args = ["run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(exp))}", "--set", "parallel.name=fsdp2",
                "--set", "parallel.param_dtype=fp32", "--set", "train.max_steps=4", "--set", "train.fid_every=2",
                "--set", "train.fid_num_samples=7", "--set", f"train.fid_ref={json.dumps(ref)}", "--set", EXTRACTOR,
                "--set", "sample.batch_size=3"]
        # one rank in this process (eval_helpers imports here already), two through the launcher
        res = run_minfm(*args, "--nproc-per-node", "2", env=env) if nproc == 2 else minfm_in_process(*args)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        fid[nproc] = [m["fid"] for m in read_metrics(exp) if "fid" in m]
    assert len(fid[1]) == 2 and fid[2] == pytest.approx(fid[1], rel=1e-4)



def test_the_samples_prompts_spread_over_the_whole_val_split():
    """The first N val items of a class-ordered split are its first classes only (5,000 of
    ImageNet's 50,000: 100 of 1,000 classes)."""
    assert [val_item(g, 5, 50) for g in range(5)] == [0, 10, 20, 30, 40]
    assert [val_item(g, 4, 4) for g in range(4)] == [0, 1, 2, 3]
    assert [val_item(g, 6, 4) for g in range(6)] == [0, 1, 2, 3, 0, 1]  # more samples than items: round again


def test_a_damaged_reference_stops_the_run_before_step_1(tmp_path):
    """The reference was read at the first FID step: a cut-off .npz stopped the run there,
    hours in; its header alone was read at start-up."""
    ref = tmp_path / "ref.npz"
    save_npz(ref, images(12, seed=1, size=16))
    data = bytearray(ref.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte of pixels: its CRC-32 fails
    ref.write_bytes(bytes(data))
    res = minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'run'))}",
                           "--set", "train.fid_every=2", "--set", f"train.fid_ref={json.dumps(str(ref))}",
                           "--set", EXTRACTOR)
    assert res.returncode == 2 and "CRC" in res.stderr and "Traceback" not in res.stderr, res.stderr
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or '"loss"' not in metrics.read_text()  # not one step trained


def test_a_failure_at_an_fid_step_keeps_that_steps_checkpoint(tmp_path):
    """The FID ran before the step's checkpoint was saved: a failure in it lost the step."""
    from minfm_core.checkpoint import list_checkpoints

    ref = save_npz(tmp_path / "ref.npz", images(12, seed=1, size=16))
    run = tmp_path / "run"
    res = minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(run))}", "--set", "train.fid_every=3",
                           "--set", "train.ckpt_every=3", "--set", f"train.fid_ref={json.dumps(ref)}",
                           "--set", 'train.fid_extractor="eval_helpers:make_reference_only_extractor"')
    assert res.returncode == 2 and "the extractor refuses the samples" in res.stderr, res.stderr
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]


class _Doubled:
    """A plugin's metric: the built-in FID's members, twice its distance (to tell them apart)."""

    def __init__(self, ref, **kwargs):
        from minfm_plugins.eval.fid import FidMetric

        self.inner = FidMetric(ref, **kwargs)
        self.features, self.reference_features, self.stats = (
            self.inner.features, self.inner.reference_features, self.inner.stats)

    def distance(self, a, b):
        return 2 * self.inner.distance(a, b)


class _DoubledPlugin:
    @hookimpl
    def register_metrics(self, register):
        register("doubled_fid", _Doubled, doc="twice the FID")


def test_a_plugins_metric_is_chosen_by_train_fid_metric_and_logged_under_its_name(tmp_path):
    ref = save_npz(tmp_path / "ref.npz", images(12, seed=1, size=16))
    sets = ["train.fid_every=2", "train.max_steps=2", "train.fid_num_samples=4", f"train.fid_ref={json.dumps(ref)}",
            EXTRACTOR]
    assert job_checks(tiny(tmp_path / "c", *sets, 'train.fid_metric="doubled_fid"'), "train") == [
        "train.fid_metric: no plugin registers the image metric 'doubled_fid' that the in-training FID uses "
        "(installed: fid; minFM's own 'fid' is the 'eval' plugin's) (from --set train.fid_metric)"]
    assert job_checks(tiny(tmp_path / "d", *sets, 'train.fid_metric="val_loss"'), "train") == [
        "train.fid_metric: 'val_loss' is a name the trainer logs itself (step, loss, grad_norm, lr, skipped, "
        "tokens_per_sec, mfu, val_loss); register the metric under another (from --set train.fid_metric)"]
    with plugin(_DoubledPlugin(), "doubled"):
        train(tiny(tmp_path / "a", *sets, 'train.fid_metric="doubled_fid"'))
    train(tiny(tmp_path / "b", *sets))
    ours = [m for m in read_metrics(tmp_path / "a") if "doubled_fid" in m]
    theirs = [m for m in read_metrics(tmp_path / "b") if "fid" in m]
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == [2]
    assert not any("fid" in m for m in read_metrics(tmp_path / "a"))
    assert ours[0]["doubled_fid"] == pytest.approx(2 * theirs[0]["fid"], rel=1e-6)
