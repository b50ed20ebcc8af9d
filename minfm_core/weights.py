"""Reading and writing model weights as safetensors (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import MinfmError

#: Recipe dtype names (``minfm_core.config.Dtype``) -> torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def has_weights(folder: Path, name: str = "model") -> bool:
    """Whether ``folder`` holds ``<name>`` weights: one safetensors file or an index of shards."""
    return (folder / f"{name}.safetensors").is_file() or (folder / f"{name}.safetensors.index.json").is_file()


def read_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """``<name>.safetensors`` or the shards listed in ``<name>.safetensors.index.json``."""
    single = folder / f"{name}.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / f"{name}.safetensors.index.json"
    if not index.is_file():
        raise MinfmError(f"{folder}: no {name}.safetensors")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def check_keys(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str, *, partial: bool = False) -> None:
    """Refuse to load on missing/unexpected keys or shape mismatches, naming them."""
    own = model.state_dict()
    missing = [] if partial else set(own) - set(sd)
    unexpected = set(sd) - set(own)
    shapes = [f"{k} {tuple(sd[k].shape)} (model wants {tuple(own[k].shape)})"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    problems = [f"{what}: {first_names(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    if problems:
        raise MinfmError(f"{where}: weights do not fit the model: " + "; ".join(problems))


def first_names(items, limit: int = 10) -> str:
    """``a, b, c and 7 more``: a bounded list of names for an error message."""
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_safetensors_into(model: torch.nn.Module, folder: Path, name: str = "model") -> None:
    sd = read_safetensors(Path(folder), name)
    # EMA files hold the trainable parameters only; buffers keep their values.
    check_keys(model, sd, f"{folder}/{name}.safetensors", partial=(name == "ema"))
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        # A sharded (FSDP2) model: each rank keeps only its shards of the full tensors.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=name != "ema"))
    else:
        model.load_state_dict(sd, strict=name != "ema")
