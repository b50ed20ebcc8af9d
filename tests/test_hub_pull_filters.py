"""What a pull takes from a repo's listing (hub.pull.file_filters): a repo laid out as a run
folder (`checkpoints/step_N/...`, optimizer state included) was taken whole by `minfm sample
hf://...`, whose docs say sampling never downloads training state."""

from __future__ import annotations

import types

import pytest

from minfm_hub.pull import _wanted, file_filters

LISTING = ["model.safetensors", "ema.safetensors", "recipe.toml", "README.md", "transformer/config.json",
           "checkpoint/manifest.json", "checkpoint/rank_0.safetensors",
           "checkpoints/step_00000100/optimizer.safetensors", "checkpoints/step_00000100/manifest.json",
           "weights.bin"]


@pytest.mark.parametrize("training_state, extra", [(False, []), (True, ["checkpoint/manifest.json",
                                                                           "checkpoint/rank_0.safetensors"])])
def test_a_pull_takes_the_model_and_only_the_training_state_asked_for(training_state, extra):
    siblings = [types.SimpleNamespace(rfilename=name) for name in LISTING]
    got = sorted(s.rfilename for s in _wanted(siblings, file_filters(training_state)))
    assert got == sorted(["model.safetensors", "ema.safetensors", "recipe.toml", "README.md",
                          "transformer/config.json", *extra])
