"""A checkpoint's values, not only its format, are checked when a run loads them.

A forger (or a damaged disk whose file the manifest was rewritten for) could hand a run state
no run makes, and each trained on and exited 0: NaN weights skipped every step as a spike,
negative second moments sent the weights to NaN a step later, a negative trainer.norm_mean
skipped every step, a step tensor saying 3 in step 6's folder re-trained over the real
step 6 with step 6's data position; and train.init_from a checkpoint past train.max_steps
trained nothing. Weights of an integer dtype were cast silently and float8 ones crashed the
finite check with a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoint_helpers import copy_run, refresh_record, trained_run  # noqa: F401  (fixture)
from conftest import minfm_in_process
from engine_helpers import TINY
from minfm_core.errors import MinfmError
from minfm_core.weights import check_finite, check_keys


def _edit_tensors(ckpt: Path, edit) -> None:
    """Rewrite tensors of the checkpoint's data file through ``edit(name, tensor) -> tensor or
    None`` (None: unchanged) and make the manifest vouch for the new file, as a forger would."""
    (data,) = ckpt.glob("*.distcp")
    with safe_open(str(data), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(data))
    hits = 0
    for name, t in list(tensors.items()):
        new = edit(name, t)
        if new is not None:
            tensors[name], hits = new.contiguous(), hits + 1
    assert hits, "the edit matched no tensor"
    save_file(tensors, str(data), metadata=meta)
    refresh_record(ckpt, data.name)


def _first(prefix: str, suffix: str = ""):
    done = []

    def edit(name, t):
        if name.startswith(prefix) and name.endswith(suffix) and t.is_floating_point() and not done:
            done.append(name)
            return t.clone().fill_(float("nan")) if suffix != "exp_avg_sq" else -t.abs() - 1
        return None

    return edit


def _resume(run: Path, *sets: str):
    return minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(run))}",
                            "--set", "train.max_steps=6", *(a for s in sets for a in ("--set", s)))


@pytest.mark.parametrize("edit, says", [
    (_first("model."), r"\(model weights\): \S+: NaN or infinite values"),
    (_first("ema."), r"\(ema weights\): \S+: NaN or infinite values"),
    (_first("optimizer.state.", "exp_avg_sq"), r"\(optimizer state\): \S+exp_avg_sq: negative values"),
    (lambda n, t: torch.full_like(t, -1.0) if n == "trainer.norm_mean" else None,
     r": trainer\.norm_mean -1\.0 is not a mean gradient norm \(finite, >= 0\)"),
    (lambda n, t: torch.full_like(t, 3) if n == "step" else None, r": its step tensor says 3, its manifest 4"),
], ids=["nan_model", "nan_ema", "negative_moments", "norm_mean", "step"])
def test_a_resume_refuses_state_no_run_makes(trained_run, tmp_path, edit, says):  # noqa: F811
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    _edit_tensors(ckpt, edit)
    res = _resume(run)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.search(re.escape(str(ckpt)) + ".*" + says, last), last
    assert ckpt.is_dir() and not (run / "checkpoints" / "step_00000006").exists()  # nothing lost, nothing trained


def test_the_untampered_checkpoint_resumes(trained_run, tmp_path):  # noqa: F811
    run = copy_run(trained_run, tmp_path / "run")
    res = _resume(run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "checkpoints" / "step_00000006").is_dir()


def test_init_from_a_step_past_max_steps_is_refused(trained_run, tmp_path):  # noqa: F811
    ckpt = trained_run / "checkpoints" / "step_00000004"
    res = minfm_in_process("run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'new'))}",
                           "--set", f"train.init_from={json.dumps(str(ckpt))}", "--set", "train.max_steps=3")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"minfm: error: train.init_from = {ckpt}: its step 4 (train.init_load_plan loads the step) is not below "
        "train.max_steps = 3: nothing to train; raise train.max_steps, or leave the step out of the plan")


def test_weights_of_an_integer_dtype_are_refused_and_float8_ones_are_read():
    model = torch.nn.Linear(2, 2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    check_keys(model, sd, "w.safetensors")
    with pytest.raises(MinfmError, match=r"^w.safetensors: weights do not fit the model: dtype mismatches: "
                                         r"weight int32 \(model wants floating point\)$"):
        check_keys(model, {**sd, "weight": sd["weight"].to(torch.int32)}, "w.safetensors")
    f8 = {"weight": sd["weight"].to(torch.float8_e4m3fn)}
    check_finite(f8, "w.safetensors")  # before: NotImplementedError, "isfinite" not implemented for Float8
    f8["weight"][0, 0] = float("nan")
    with pytest.raises(MinfmError, match=r"^w.safetensors: NaN or infinite values in weight"):
        check_finite(f8, "w.safetensors")
