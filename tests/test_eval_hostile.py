"""Inception weights from outside: only regular files are read, and wrong keys are one line."""

from __future__ import annotations

import os
import sys
import threading
import time
import types

import pytest
import torch
from safetensors.torch import save_file

from minfm_core.errors import MinfmError
from minfm_plugins.eval import inception


def _unblock_reader(path, seconds: float = 10.0) -> None:
    """Open the FIFO's write end once someone reads it: a reader that (wrongly) opened it
    then gets EOF instead of hanging the test run."""
    def run():
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:
                time.sleep(0.05)
    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_fifo_as_inception_weights_is_refused_unread(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    _unblock_reader(fifo)
    with pytest.raises(MinfmError, match=f"{name}: Inception weights: not a regular file"):
        inception.load_state_dict(fifo)


def test_non_tensor_pickle_is_refused(tmp_path):
    bad = tmp_path / "w.pth"
    torch.save({"a": 1}, bad)
    with pytest.raises(MinfmError, match="w.pth: not an Inception state dict"):
        inception.load_state_dict(bad)


def test_wrong_keys_name_the_file(tmp_path, monkeypatch):
    """torch-fidelity's extractor loads with self.load_state_dict: a stand-in with one layer."""
    class FakeExtractor(torch.nn.Module):
        def __init__(self, name, features):
            super().__init__()
            self.Mixed_6d = types.SimpleNamespace(branch1x1=torch.nn.Linear(2, 2))
            self.fc = torch.nn.Linear(2, 2)
            self.load_state_dict(fe.load_state_dict_from_url("url"))

    fe = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fe.FeatureExtractorInceptionV3 = FakeExtractor
    fe.load_state_dict_from_url = lambda *a, **k: pytest.fail("downloaded")
    pkg = types.ModuleType("torch_fidelity")
    pkg.feature_extractor_inceptionv3 = fe
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fe)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(1)}, str(wrong))
    with pytest.raises(MinfmError, match=r"wrong.safetensors: Inception weights: weights do not fit the model: "
                                         r"missing keys: fc.bias, fc.weight; unexpected keys: x"):
        inception.InceptionFeatures(wrong)
    shapes = tmp_path / "shapes.safetensors"
    save_file({"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(2)}, str(shapes))
    with pytest.raises(MinfmError, match=r"shapes.safetensors: .*shape mismatches: fc.weight \(3, 2\)"):
        inception.InceptionFeatures(shapes)
    right = tmp_path / "right.safetensors"
    save_file({"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}, str(right))
    assert torch.equal(inception.InceptionFeatures(right).net.fc.weight, torch.ones(2, 2))
