"""FLUX weights from outside, and exports over old ones: what is refused, and what is replaced
(plugins/flux/state_dict.py, plugins/flux/export.py, minfm_core.weights.check_header)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from flux_helpers import diffusers_twin, random_flux
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError
from minfm_plugins.flux.config import FluxConfig
from minfm_plugins.flux.model import build_flux
from minfm_plugins.flux.state_dict import bfl_to_diffusers, diffusers_to_bfl

RECIPE = '[model.denoiser]\nname = "flux"\nflavor = "flux-debug"\n'


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _model_folder(tmp_path, model, name="run"):
    """A model folder as export_for_hub writes it: model.safetensors, ema.safetensors, recipe.toml."""
    folder = tmp_path / name
    folder.mkdir()
    _save(model.state_dict(), folder / "model.safetensors")
    _save({k: v + 1 for k, v in model.state_dict().items()}, folder / "ema.safetensors")
    (folder / "recipe.toml").write_text(RECIPE)
    return folder


def _exported_weights(out):
    from safetensors.torch import load_file

    return diffusers_to_bfl(load_file(str(out / "diffusion_pytorch_model.safetensors")))


def test_an_export_over_a_sharded_one_replaces_it(tmp_path, capsys):
    """diffusers prefers an index over the single file: an old export saved sharded into the same
    folder was what from_pretrained loaded after the new export said "wrote"."""
    from diffusers import FluxTransformer2DModel

    old, new = random_flux(), random_flux()
    out = tmp_path / "out"
    diffusers_twin(old).save_pretrained(out, max_shard_size="20KB")
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    (out / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"old variant")
    (out / "notes.txt").write_text("mine")
    assert main(["export", "diffusers", str(_model_folder(tmp_path, new)), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "notes.txt"]
    loaded = FluxTransformer2DModel.from_pretrained(str(out)).state_dict()
    want = bfl_to_diffusers(new.state_dict())
    assert all(torch.equal(loaded[k], want[k]) for k in want)


def test_ema_of_a_file_is_refused_and_a_sharded_folder_exports(tmp_path, capsys):
    model = random_flux()
    folder = _model_folder(tmp_path, model)
    assert main(["export", "diffusers", str(folder / "model.safetensors"), str(tmp_path / "o1"), "--ema"]) == 2
    assert "--ema: " in capsys.readouterr().err
    # a pushed model over the shard size: model-0000x-of-0000y.safetensors + index (flux-dev on the Hub)
    from safetensors.torch import load_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for stem in ("model", "ema"):
        sd = load_file(str(folder / f"{stem}.safetensors"))
        keys = sorted(sd)
        halves = {f"{stem}-00001-of-00002.safetensors": keys[::2], f"{stem}-00002-of-00002.safetensors": keys[1::2]}
        for name, part in halves.items():
            _save({k: sd[k] for k in part}, sharded / name)
        weight_map = {k: name for name, part in halves.items() for k in part}
        (sharded / f"{stem}.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "recipe.toml").write_text(RECIPE)
    assert not (sharded / "model.safetensors").exists() and (sharded / "model.safetensors.index.json").is_file()
    for flags, want in (([], model.state_dict()), (["--ema"], {k: v + 1 for k, v in model.state_dict().items()})):
        out = tmp_path / ("o-" + "-".join(flags))
        assert main(["export", "diffusers", str(sharded), str(out), *flags]) == 0, capsys.readouterr().err
        got = _exported_weights(out)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # a folder without the EMA file names the folder the user gave (not a temporary copy)
    (folder / "ema.safetensors").unlink()
    assert main(["export", "diffusers", str(folder), str(tmp_path / "o2"), "--ema"]) == 2
    assert f"{folder}: no ema.safetensors" in capsys.readouterr().err


def _diffusers_sd():
    return bfl_to_diffusers(random_flux().state_dict())


@pytest.mark.parametrize("change, message", [
    # one key of a huge block index built the rules of 1e8 blocks (gigabytes) before any check
    (lambda sd: sd.update({"transformer_blocks.100000000.foo": torch.zeros(1)}),
     "transformer_blocks.<i> blocks are not numbered 0, 1, 2, ... (there is a transformer_blocks.100000000 among 3 blocks)"),
    (lambda sd: sd.update({"transformer_blocks.x.foo": torch.zeros(1)}), "unexpected key 'transformer_blocks.x.foo'"),
    (lambda sd: sd.update({"transformer_blocks.3.foo": torch.zeros(1)}), "not numbered 0, 1, 2, ... (missing 2)"),
    (lambda sd: sd.update({"transformer_blocks..foo": torch.zeros(1)}), "unexpected key 'transformer_blocks..foo'"),
    (lambda sd: sd.pop("transformer_blocks.0.attn.to_q.weight"), "missing keys transformer_blocks.0.attn.to_q.weight"),
    (lambda sd: sd.pop("transformer_blocks.0.attn.to_k.weight"), "missing keys transformer_blocks.0.attn.to_k.weight"),
    (lambda sd: sd.pop("single_transformer_blocks.0.proj_mlp.weight"),
     "missing keys single_transformer_blocks.0.proj_mlp.weight"),
])
def test_a_malformed_diffusers_state_dict_is_one_error(change, message):
    sd = _diffusers_sd()
    change(sd)
    with pytest.raises(MinfmError) as err:
        diffusers_to_bfl(sd)
    assert message in str(err.value)


@pytest.mark.parametrize("poison, message", [
    (lambda t: t.fill_(float("nan")), "NaN or infinite values in img_in.weight"),
    (lambda t: t.to(torch.int32), "dtype mismatches: img_in.weight int32 (model wants floating point)"),
    (lambda t: t > 0, "dtype mismatches: img_in.weight bool (model wants floating point)"),
])
def test_pretrained_weights_must_be_finite_floats(tmp_path, poison, message):
    sd = dict(random_flux().state_dict())
    sd["img_in.weight"] = poison(sd["img_in.weight"].clone())
    path = _save(sd, tmp_path / "flux1-dev.safetensors")
    for build in (lambda: build_flux(FluxConfig(flavor="flux-debug", pretrained=str(path))),  # one process
                  lambda: _meta(path).pretrained_state_dict()):  # rank 0 of a sharded build
        with pytest.raises(MinfmError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build()


def _meta(path):
    with torch.device("meta"):
        return build_flux(FluxConfig(flavor="flux-debug", pretrained=str(path)), load_weights=False)


def test_links_out_of_a_pretrained_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    weights = _save(random_flux().state_dict(), outside / "flux1-dev.safetensors")
    bfl = tmp_path / "bfl"
    bfl.mkdir()
    os.symlink(weights, bfl / "flux1-dev.safetensors")
    diffusers_twin(random_flux()).save_pretrained(outside / "transformer")
    sub = tmp_path / "sub"
    sub.mkdir()
    os.symlink(outside / "transformer", sub / "transformer")
    for folder in (bfl, sub):
        with pytest.raises(MinfmError, match="a symlink leads outside"):
            build_flux(FluxConfig(flavor="flux-debug", pretrained=str(folder)))


def test_a_fifo_named_like_weights_is_refused_not_waited_on(tmp_path, capsys):
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(MinfmError, match="not a regular file"):
        build_flux(FluxConfig(flavor="flux-debug", pretrained=str(fifo)))
    assert main(["export", "diffusers", str(fifo), str(tmp_path / "out"), "--flavor", "flux-debug"]) == 2
    assert "w.safetensors: not a regular file" in capsys.readouterr().err
