"""Multi-process training on CPU (gloo, 127.0.0.1): FSDP2, HSDP, resharding, kills, load plans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, minfm_in_process, run_minfm
from engine_helpers import TINY, losses, read_metrics
from minfm_core import checkpoint as ck
from minfm_core.recipe import ONE_PROCESS, load_recipe

FSDP = ["--set", "parallel.name=fsdp2", "--set", "parallel.param_dtype=fp32", "--set", "train.text_dropout=0.3"]


def run(exp: Path, *args: str, nproc: int = 1, check: bool = True):
    """``minfm run`` of the tiny recipe with FSDP2: in this process for one rank (the single-rank
    reference the multi-process runs are compared with needs no interpreter of its own)."""
    argv = ["run", str(TINY), "--set", f"run.exp_dir={exp}", *FSDP, *args]
    res = run_minfm(*argv, "--nproc-per-node", str(nproc)) if nproc > 1 else minfm_in_process(*argv)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def weights(ckpt: Path, source: str = "model") -> dict[str, torch.Tensor]:
    resolved = load_recipe(ckpt / "recipe.toml", list(ONE_PROCESS))
    model = resolved["model.denoiser"].build(load_weights=True)
    ck.load_weights(ckpt, model, source=source)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=k)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Same global batch (8 = 4 x 2 ranks vs 4 x 2 micro-batches): same losses and weights.

    Per-sample noise and time come from (seed, epoch, index), so only float summation
    order differs; tolerance 1e-5 relative.
    """
    # EMA swapped into the sharded model at the end; validation over 9 samples (uneven per rank).
    gallery = ["--set", "train.sample_every=5", "--set", "train.val_every=5", "--set", "train.val_num_samples=9"]
    run(tmp_path / "one", "--set", "train.max_steps=5", *gallery)
    run(tmp_path / "two", "--set", "train.max_steps=5", *gallery, nproc=2)
    for d in ("one", "two"):
        assert (tmp_path / d / "samples" / "step_00000005" / "ema.png").is_file()
    val = [[m["val_loss"] for m in read_metrics(tmp_path / d) if "val_loss" in m] for d in ("one", "two")]
    assert len(val[0]) == 1 and val[0] == pytest.approx(val[1], rel=1e-5)
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 5
    assert l1 == pytest.approx(l2, rel=1e-5)
    c1, c2 = ck.list_checkpoints(tmp_path / "one")[-1], ck.list_checkpoints(tmp_path / "two")[-1]
    assert_same(weights(c1), weights(c2))
    assert_same(weights(c1, "ema"), weights(c2, "ema"))


@pytest.mark.slow
def test_hsdp_four_processes_shard_two(tmp_path):
    """HSDP with KnapFormer bags of 2 GPUs trains as one process does; and the run samples in
    one process (its shard_size and bags, made for 4 ranks, refused `minfm sample` there)."""
    run(tmp_path / "one", "--set", "train.max_steps=3", "--set", "train.total_batch_size=16")
    run(tmp_path / "hsdp", "--set", "train.max_steps=3", "--set", "train.total_batch_size=16",
        "--set", "parallel.shard_size=2", "--set", "balancer.name=knapformer", "--set", "balancer.bags=g2n1",
        nproc=4)
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "hsdp"), rel=1e-5)
    assert_same(weights(ck.list_checkpoints(tmp_path / "one")[-1]), weights(ck.list_checkpoints(tmp_path / "hsdp")[-1]))
    from PIL import Image

    pixels = {}
    for d in ("one", "hsdp"):
        res = minfm_in_process("sample", str(tmp_path / d), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                               "--out", str(tmp_path / f"s_{d}"))
        assert res.returncode == 0, res.stderr
        (png,) = sorted((tmp_path / f"s_{d}").rglob("*.png"))
        pixels[d] = torch.from_numpy(__import__("numpy").asarray(Image.open(png), dtype="float32"))
    assert (pixels["one"] - pixels["hsdp"]).abs().max() <= 1.0  # the weights agree to 1e-6: a rounding step at most


@pytest.mark.slow
def test_resume_at_other_world_size(tmp_path):
    """Saved by 2 processes, resumed by 1 (and the reverse): weights load exactly, and the run
    goes on as the uninterrupted one: the data from the same global place, each sample's noise
    from (seed, epoch, index). 7 samples: 2 ranks do not split an epoch evenly (each wrapped
    its own share, so 2 processes trained on other batches than 1 from the second epoch)."""
    flat = ["--set", "data.num_samples=7", "--set", "train.min_lr=1.5e-3"]  # no decay: max_steps may change
    exp, straight = tmp_path / "a", tmp_path / "straight"
    run(exp, *flat, "--set", "train.max_steps=3", "--set", "train.ckpt_every=3", nproc=2)
    saved = weights(ck.list_checkpoints(exp)[-1])
    res = run(exp, *flat, "--set", "train.max_steps=5", "--set", "train.ckpt_every=5")
    assert "resumed at world size 1 from a checkpoint of world size 2: the data goes on from the same place" in res.stdout
    assert [c.name for c in ck.list_checkpoints(exp)] == ["step_00000003", "step_00000005"]

    def consumed(step: int) -> int:
        position = ck.open_checkpoint(exp / "checkpoints" / f"step_{step:08d}").rank_extras(0)[1]["data"]
        return json.loads(position)["consumed"]

    assert consumed(3) == 3 * 8 // 2 and consumed(5) == 5 * 8  # per rank: the same global place
    # And back: one process wrote step 5, two processes load it.
    run(exp, *flat, "--set", "train.max_steps=6", "--set", "train.ckpt_every=6", nproc=2)
    run(straight, *flat, "--set", "train.max_steps=6", "--set", "train.ckpt_every=6")
    assert losses(exp) == pytest.approx(losses(straight), rel=1e-5) and len(losses(exp)) == 6
    assert_same(weights(exp / "checkpoints" / "step_00000006"), weights(straight / "checkpoints" / "step_00000006"))
    assert_same(saved, weights(exp / "checkpoints" / "step_00000003"))


def test_sigkill_during_save_keeps_complete_checkpoints(tmp_path):
    exp = tmp_path / "k"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "minfm_core.cli.main", "run", str(TINY), "--set", f"run.exp_dir={exp}",
           "--set", "train.max_steps=200", "--set", "train.ckpt_every=1", "--set", "train.keep_last=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = exp / "checkpoints"
    deadline = time.time() + 120
    caught = False
    while time.time() < deadline:
        tmp = list(ckpts.glob(".tmp-*")) if ckpts.is_dir() else []
        if tmp and len(ck.list_checkpoints(exp)) >= 2:
            caught = True
            break
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert caught, "never saw a save in progress"
    complete = ck.list_checkpoints(exp)
    assert complete, "no complete checkpoint"
    for c in complete:
        assert (c / "manifest.json").is_file() and (c / "rank_0.safetensors").is_file()
        ck.open_checkpoint(c)  # every file there, of the size and checksum the manifest lists
    last = complete[-1]
    weights(last)  # every complete checkpoint loads
    res = run_minfm("run", str(TINY), "--set", f"run.exp_dir={exp}", "--set", f"train.max_steps={int(last.name[5:]) + 1}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {last} at step {int(last.name[5:])}" in res.stdout
    assert not list(ckpts.glob(".tmp-*"))  # the leftover partial save was cleaned up


def test_partial_directories_are_never_complete(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000009").mkdir(parents=True)
    (root / ".tmp-step_00000009" / ".metadata").write_text("x")
    (root / "step_00000008").mkdir()  # no .metadata: a copy that never finished
    (root / "step_00000007").mkdir()
    (root / "step_00000007" / ".metadata").write_text("x")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000007"]
    assert ck.find_checkpoint(tmp_path).name == "step_00000007"


def test_load_plan_parsing():
    from minfm_core.recipe.schema import parse_load_plan

    assert parse_load_plan("ema:model, optimizer:optimizer") == {"model": "ema", "optimizer": "optimizer"}
    with pytest.raises(Exception, match=r"train.init_load_plan: unknown part 'optimiser' \(did you mean 'optimizer'\?\)"):
        parse_load_plan("optimiser:optimizer")
    with pytest.raises(Exception, match="cannot load 'optimizer' into 'model'"):
        parse_load_plan("optimizer:model")


def test_init_from_ema_into_model(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    run(src, "--set", "train.max_steps=3", "--set", "train.ckpt_every=3")
    src_ckpt = ck.list_checkpoints(src)[-1]
    run(dst, "--set", "train.max_steps=1", "--set", f"train.init_from={src}",
        "--set", "train.init_load_plan='ema:model'", "--set", "train.lr=0.0", "--set", "train.min_lr=0.0",
        "--set", "train.ckpt_every=1")
    # lr 0: the model after one step is exactly the source's EMA; the optimizer started fresh.
    assert_same(weights(ck.list_checkpoints(dst)[-1]), weights(src_ckpt, "ema"))
    # and so is the new run's EMA: it starts from the loaded model, not from the random init
    assert_same(weights(ck.list_checkpoints(dst)[-1], "ema"), weights(src_ckpt, "ema"))
    assert losses(dst)  # it trained from there


def test_unknown_load_plan_entry_exit_2(tmp_path):
    src = tmp_path / "src"
    run(src, "--set", "train.max_steps=1", "--set", "train.ckpt_every=1")
    res = run(tmp_path / "dst", "--set", f"train.init_from={src}", "--set", "train.init_load_plan='emma:model'", check=False)
    assert res.returncode == 2
    assert "train.init_load_plan: unknown part 'emma' (did you mean 'ema'?)" in res.stderr
    assert "Traceback" not in res.stderr


def _pretrained_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The tiny recipe's FLUX with random weights, saved in bfloat16 as a BFL-layout file."""
    from safetensors.torch import save_file

    model = load_recipe(TINY, ["parallel.name=none"])["model.denoiser"].build(load_weights=True)
    g = torch.Generator().manual_seed(7)
    sd = {k: torch.randn(v.shape, generator=g).to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path / "flux-tiny-test.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_sharded_pretrained_denoiser_streams_from_the_file(tmp_path, monkeypatch):
    """Pretrained weights reach the shards straight from the (memory-mapped) file: no rank
    builds and initialises a full model first."""
    from minfm_core.engine.pipeline import sharded_denoiser
    from minfm_core.engine.runtime import init_runtime, shutdown_runtime
    from minfm_plugins.flux import state_dict
    from minfm_plugins.flux.model import Flux

    path, sd = _pretrained_file(tmp_path)
    resolved = load_recipe(TINY, ["parallel.name=fsdp2", "parallel.param_dtype=fp32",
                                  f"model.denoiser.pretrained={json.dumps(str(path))}"])

    def no_full_build(*args, **kwargs):
        raise AssertionError("a full model was built")

    monkeypatch.setattr(Flux, "init_weights", no_full_build)
    monkeypatch.setattr(state_dict, "load_pretrained", no_full_build)
    rt = init_runtime("cpu")
    try:
        model = sharded_denoiser(resolved, world_size=1, device=rt.device, rank=0)
        got = {k: v.full_tensor() for k, v in model.state_dict().items()}
    finally:
        shutdown_runtime()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k


@pytest.mark.slow
def test_two_processes_start_from_pretrained_weights(tmp_path):
    """lr 0: after one step on two ranks the checkpoint holds exactly the file's weights."""
    path, sd = _pretrained_file(tmp_path)
    run(tmp_path / "run", "--set", f"model.denoiser.pretrained={json.dumps(str(path))}", "--set", "train.max_steps=1",
        "--set", "train.lr=0.0", "--set", "train.min_lr=0.0", "--set", "train.ckpt_every=1", nproc=2)
    got = weights(ck.list_checkpoints(tmp_path / "run")[-1])
    assert_same(got, {k: v.float() for k, v in sd.items()}, atol=0)


def test_init_from_an_exported_folders_ema_under_fsdp2(tmp_path):
    """An exported folder's ema.safetensors holds full tensors; a sharded EMA's copy_ refused
    to mix them with its DTensors (a traceback, "a bug in minFM")."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    run(src, "--set", "train.max_steps=2", "--set", "train.ckpt_every=2")
    src_ckpt = ck.list_checkpoints(src)[-1]
    folder = ck.export_for_hub(src_ckpt, tmp_path / "exported")
    run(dst, "--set", "train.max_steps=1", "--set", f"train.init_from={folder}",
        "--set", "train.init_load_plan='model:model,ema:ema'", "--set", "train.lr=0.0", "--set", "train.min_lr=0.0",
        "--set", "train.ema_decay=0.5", "--set", "train.ckpt_every=1")
    model, ema = weights(src_ckpt), weights(src_ckpt, "ema")
    got = ck.list_checkpoints(dst)[-1]
    assert_same(weights(got), model)  # lr 0: the loaded model, unchanged
    # one EMA step from the exported EMA toward the model: it was loaded, not reset
    assert_same(weights(got, "ema"), {k: 0.5 * ema[k] + 0.5 * model[k] for k in ema})


@pytest.mark.slow
def test_a_bad_state_on_one_rank_is_refused_on_every_rank_before_anything_changes(tmp_path):
    """Each rank reads its own rank_<r>.safetensors: one refusing it left rank 0 saying
    "resumed", rewriting recipe.toml, then dying of the lost connection. Now both refuse
    together, naming the file, and the run folder is as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from checkpoint_helpers import refresh_record

    exp = tmp_path / "run"
    run(exp, "--set", "train.max_steps=2", "--set", "train.ckpt_every=2", nproc=2)
    ckpt = ck.list_checkpoints(exp)[-1]
    extras = ckpt / "rank_1.safetensors"
    with safe_open(str(extras), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    os.chmod(extras, 0o644)
    save_file(tensors, str(extras), metadata={**meta, "data": "not json"})
    refresh_record(ckpt, extras.name)
    record = (exp / "recipe.toml").read_text()
    res = run(exp, "--set", "train.max_steps=4", nproc=2, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{extras}: bad per-rank state (data position: not valid JSON" in res.stderr
    assert f"{ckpt}: another rank's per-rank state is bad (see its error)" in res.stderr
    assert "resumed" not in res.stdout and (exp / "recipe.toml").read_text() == record
    assert [c.name for c in ck.list_checkpoints(exp)] == ["step_00000002"]
