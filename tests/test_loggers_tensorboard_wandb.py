"""``tensorboard`` (when installed) and ``wandb`` (against a stand-in module) loggers."""

from __future__ import annotations

import os
import sys
import types

import pytest
from PIL import Image

from minfm_core.config import structure
from minfm_core.errors import MinfmError
from minfm_core.registry import get_registry


def make(kind, run_dir, rank=0, recipe=None, **kw):
    comp = get_registry().get("logger", kind)
    return comp.build(structure(kw, comp.config), run_dir=str(run_dir), rank=rank, recipe=recipe)


def test_tensorboard_writes_scalars_images_and_recipe(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = make("tensorboard", tmp_path, recipe={"train": {"max_steps": 5}})
    for step in range(3):
        log.log(step, {"loss": 1.0 - 0.1 * step, "lr": 1e-3, "total_steps": 3})
    log.log_images(2, "samples", [Image.new("RGB", (32, 48), "red")], ["a red square"])
    log.close()
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [round(e.value, 4) for e in acc.Scalars("loss")] == [1.0, 0.9, 0.8]
    assert "total_steps" not in acc.Tags()["scalars"]
    image = acc.Images("samples/0")[0]
    assert (image.step, image.width, image.height) == (2, 32, 48)


def test_tensorboard_full_disk_names_the_logger_and_its_folder(tmp_path):
    pytest.importorskip("tensorboard")
    from minfm_core.errors import MinfmError

    log = make("tensorboard", tmp_path)
    records = log.writer.file_writer.event_writer._async_writer._writer  # its writer thread's file
    records._writer.close()
    records._writer = open("/dev/full", "wb")  # the disk fills up
    with pytest.raises(MinfmError) as info:
        log.log(1, {"loss": 1.0})
    assert str(info.value) == f"logger 'tensorboard': {tmp_path / 'tensorboard'}: cannot write: No space left on device"
    records._writer = open(os.devnull, "wb")  # space again: its writer thread, left running, warned in a later test
    log.close()


def test_tensorboard_rank1_is_a_no_op(tmp_path):
    make("tensorboard", tmp_path, rank=1).log(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    with pytest.raises(MinfmError, match=r"minfm\[logging\]"):
        make("tensorboard", tmp_path)


class FakeRun:
    def __init__(self, **kw):
        self.init = kw
        self.url = "https://wandb.example/run"
        self.logged = []
        self.finished = False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.runs = []
    mod.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    mod.Settings = lambda **kw: ("settings", kw)
    mod.Image = lambda im, caption=None: ("image", im.size, caption)

    def init(**kw):
        if kw["mode"] == "online" and kw["project"] == "nokey":
            raise RuntimeError("api_key not configured (no-tty)")
        mod.runs.append(FakeRun(**kw))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_run_logs_and_resumes_the_same_run(tmp_path, fake_wandb):
    log = make("wandb", tmp_path / "exp1", recipe={"a": 1}, mode="offline", project="p", entity="me")
    log.log(5, {"loss": 0.5, "total_steps": 10})
    log.log_images(5, "samples", [Image.new("RGB", (8, 8))], ["cap"])
    log.close()
    run = fake_wandb.runs[0]
    assert run.init["project"] == "p" and run.init["entity"] == "me" and run.init["name"] == "exp1"
    assert run.init["mode"] == "offline" and run.init["config"] == {"a": 1} and run.init["id"] == "abc123"
    assert run.init["settings"] is None and run.init["dir"] == str(tmp_path / "exp1")
    assert run.logged == [(5, {"loss": 0.5}), (5, {"samples": [("image", (8, 8), "cap")]})]
    assert run.finished
    assert not (tmp_path / "exp1" / "wandb_url.txt").exists()  # offline runs have no URL to keep
    fake_wandb.util.generate_id = lambda: "other"
    make("wandb", tmp_path / "exp1", mode="online", host="https://wandb.local", run_name="n")
    again = fake_wandb.runs[1]
    assert again.init["id"] == "abc123" and again.init["resume"] == "allow"  # same run continues
    assert again.init["settings"] == ("settings", {"base_url": "https://wandb.local"}) and again.init["name"] == "n"
    assert (tmp_path / "exp1" / "wandb_url.txt").read_text().strip() == "https://wandb.example/run"


def test_wandb_disabled_and_other_ranks_need_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    make("wandb", tmp_path, mode="disabled").log(1, {"loss": 1.0})
    make("wandb", tmp_path, rank=3).log(1, {"loss": 1.0})
    with pytest.raises(MinfmError, match=r"pip install 'minfm\[logging\]'"):
        make("wandb", tmp_path, mode="offline")


def test_wandb_start_failure_is_a_user_error(tmp_path, fake_wandb):
    with pytest.raises(MinfmError, match="WANDB_API_KEY"):
        make("wandb", tmp_path, project="nokey")


@pytest.mark.parametrize("subdir", ["../x", "/abs", "", "~/x", "a/../../b", "   ", "tb/ ", " tb", "a\tb", "tb/\x1b[2J"])
def test_tensorboard_subdir_stays_inside_the_run_directory(subdir):
    from minfm_core.config import structure
    from minfm_core.errors import RecipeError
    from minfm_core.registry import get_registry

    comp = get_registry().get("logger", "tensorboard")
    with pytest.raises(RecipeError, match="subdir: .* is not a (plain )?folder (path )?inside the run directory"):
        structure({"subdir": subdir}, comp.config, path="logging.loggers[0]")
    assert structure({"subdir": "tb/run1"}, comp.config).subdir == "tb/run1"
