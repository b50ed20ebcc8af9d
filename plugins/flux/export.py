"""Export native FLUX weights as a diffusers ``FluxTransformer2DModel`` folder."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from minfm_core.config import structure
from minfm_core.errors import MinfmError
from minfm_core.weights import DTYPES, has_weights

from .config import FluxConfig
from .model import Flux
from .state_dict import bfl_to_diffusers, check_state_dict, strip_prefix



def config_from_recipe(path: Path) -> FluxConfig:
    """The denoiser config of a (resolved) recipe file."""
    from minfm_core.recipe.load import load_recipe_dict
    from minfm_core.safepath import recipe_root

    # A recipe downloaded with the weights is data, not config of ours: no ${VAR} expansion,
    # and its extends stays inside its folder.
    raw = load_recipe_dict(path, (), untrusted_root=recipe_root(Path(path)))
    table = dict(raw.get("model", {}).get("denoiser") or {})
    if table.pop("name", None) != "flux":
        raise MinfmError(f"{path}: model.denoiser is not a 'flux' denoiser")
    return structure(table, FluxConfig, path="model.denoiser", source=str(path))


def _source(src: Path, flavor: str | None, ema: bool, name: str) -> tuple[Path, str | None, FluxConfig]:
    """(folder or file, weights stem in the folder or None for a file, config)."""
    stem = "ema" if ema else "model"
    if src.is_dir():
        # one file or the shards of an index (a pushed model over the shard size, flux-dev)
        if not has_weights(src, stem):
            raise MinfmError(f"{name}: no {stem}.safetensors" + (" (the run kept no EMA weights?)" if ema else ""))
        recipe = src / "recipe.toml"
    elif src.suffix == ".safetensors" and src.exists():
        if ema:  # a file is the weights it names: --ema would be ignored
            raise MinfmError(f"--ema: {name} is one weights file; name its ema.safetensors instead "
                             "(or the folder that holds both)")
        stem, recipe = None, src.parent / "recipe.toml"
    else:
        raise MinfmError(f"{name}: expected a .safetensors file or a folder holding model.safetensors")
    if flavor is not None:
        if recipe.exists():  # it was used over the recipe, and the run's weights did not fit it
            raise MinfmError(f"--flavor {flavor}: {name} has a recipe.toml, which names the model; leave "
                             "--flavor out (it is for weights without one)")
        cfg = FluxConfig(flavor=flavor)
    elif recipe.exists():
        cfg = config_from_recipe(recipe)
    else:
        raise MinfmError(f"{name}: no recipe.toml next to the weights; pass --flavor")
    return src, stem, cfg


#: What diffusers reads as this model's weights besides the file an export writes: an index
#: (preferred over the single file), its shards, variants (``.fp16``). Left from an earlier
#: export or save into the same folder, they were loaded instead of the new weights.
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.safetensors.index.json")
_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def export_diffusers(src: str, out_dir: str, *, flavor: str | None = None, ema: bool = False, dtype: str = "keep",
                     name: str | None = None) -> Path:
    """Write ``diffusion_pytorch_model.safetensors`` + ``config.json`` to ``out_dir``, replacing
    any weights diffusers would read there instead (an index, shards, variants).

    ``name``: what errors call the weights (the user's SRC, when ``src`` is a consolidated copy)."""
    from minfm_core.safepath import write_text_atomic
    from minfm_core.weights import load_safetensors_file, read_safetensors, save_safetensors_file

    from .state_dict import diffusers_config

    where, stem, cfg = _source(Path(os.path.expanduser(src)), flavor, ema, name or src)
    conf = diffusers_config(cfg)  # refuse before reading gigabytes
    sd = strip_prefix(read_safetensors(where, stem) if stem else load_safetensors_file(where))
    with torch.device("meta"):
        check_state_dict(Flux(cfg, attention=None), sd,
                         source=(name or str(where)) + (f" as --flavor {flavor}" if flavor else ""))
    if dtype != "keep":
        sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
    out = Path(os.path.expanduser(out_dir))
    made = not os.path.lexists(out)
    out.mkdir(parents=True, exist_ok=True)
    converted = {k: v.contiguous() for k, v in bfl_to_diffusers(sd).items()}
    try:
        save_safetensors_file(converted, out / _WEIGHTS_NAME, metadata={"format": "pt"})
    except BaseException:
        if made:  # a failed export into a new folder leaves no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    try:
        import diffusers

        conf["_diffusers_version"] = diffusers.__version__
    except ImportError:
        pass
    write_text_atomic(out / "config.json", json.dumps(conf, indent=2) + "\n")
    # Only now that the new weights are whole: a failed export leaves the old model as it was.
    for stale in sorted({p for pattern in _DIFFUSERS_WEIGHTS for p in out.glob(pattern)},
                        key=lambda p: (not p.name.endswith(".json"), p.name)):  # the index first
        if stale.name != _WEIGHTS_NAME:
            stale.unlink()  # (a link is removed, never followed)
    return out
