"""A shard index is honoured: each shard holds exactly what ``weight_map`` maps to it. A
repo whose second shard repeated a tensor of the first (filled with 7.0) loaded the 7s,
whatever the index said, and sampled with them (exit 0)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from minfm_core.errors import MinfmError
from minfm_core.weights import check_weights_folder, read_safetensors


def _sharded(folder, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str]):
    folder.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


A, B = torch.zeros(3), torch.ones(2)
GOOD = {"model-1.safetensors": {"a": A}, "model-2.safetensors": {"b": B}}
MAP = {"a": "model-1.safetensors", "b": "model-2.safetensors"}


def test_an_index_that_agrees_with_its_shards_loads(tmp_path):
    sd = read_safetensors(_sharded(tmp_path / "m", GOOD, MAP), "model")
    assert torch.equal(sd["a"], A) and torch.equal(sd["b"], B)
    check_weights_folder(tmp_path / "m")


@pytest.mark.parametrize("shards, weight_map, message", [
    # the hostile repo: a tensor repeated in a later shard
    ({"model-1.safetensors": {"a": A}, "model-2.safetensors": {"a": torch.full((3,), 7.0), "b": B}}, MAP,
     "model-2.safetensors holds tensors the index maps to another shard or not at all: a"),
    # a tensor the index does not list
    ({"model-1.safetensors": {"a": A, "x": A.clone()}, "model-2.safetensors": {"b": B}}, MAP,
     "model-1.safetensors holds tensors the index maps to another shard or not at all: x"),
    # a tensor the index lists where its shard does not hold it
    ({"model-1.safetensors": {"a": A}, "model-2.safetensors": {"b": B}}, {**MAP, "c": "model-2.safetensors"},
     "maps tensors that no shard holds: c"),
])
def test_a_shard_that_disagrees_with_the_index_is_refused(tmp_path, shards, weight_map, message):
    folder = _sharded(tmp_path / "m", shards, weight_map)
    for read in (lambda: read_safetensors(folder, "model"), lambda: check_weights_folder(folder)):
        with pytest.raises(MinfmError) as exc:
            read()
        assert str(exc.value) == f"{folder / 'model.safetensors.index.json'}: {message}"
