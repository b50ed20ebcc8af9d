"""FLUX weight formats: BFL native layout, the diffusers adapter, checked loading, export."""

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file

from flux_helpers import diffusers_forward, diffusers_twin, make_batch, random_flux, sample
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError
from minfm_plugins.flux.config import FluxConfig
from minfm_plugins.flux.model import build_flux
from minfm_plugins.flux.state_dict import bfl_to_diffusers, check_state_dict, diffusers_to_bfl

BATCH = ([(4, 6), (3, 3)], [7, 3])


def _outputs_match(model, ref, guidance=False):
    batch = make_batch(model.cfg, *BATCH, guidance=guidance)
    with torch.no_grad():
        out = model(**batch)
        for i in range(2):
            one, rows = sample(batch, i)
            assert (out[rows] - diffusers_forward(ref, one)).abs().max() <= 1e-4


def test_adapter_round_trip_is_exact():
    sd = random_flux(guidance=True).state_dict()
    back = diffusers_to_bfl(bfl_to_diffusers(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _diffusers_single_file_converter(width: int):
    """diffusers' own BFL -> diffusers converter, with its hard-coded FLUX.1 width (3072) set to ours."""
    from diffusers.loaders import single_file_utils

    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    namespace = dict(vars(single_file_utils))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {width}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.mark.parametrize("guidance", [False, True])
def test_bfl_layout_agrees_with_diffusers_single_file_converter(guidance):
    model = random_flux(guidance=guidance)
    convert = _diffusers_single_file_converter(model.cfg.d_model)
    checkpoint = {"model.diffusion_model." + k: v.clone() for k, v in model.state_dict().items()}
    converted = convert(checkpoint)
    ours = bfl_to_diffusers(model.state_dict())
    assert converted.keys() == ours.keys()
    ref = diffusers_twin(model)
    ref.load_state_dict(converted, strict=True)
    _outputs_match(model, ref, guidance)


@pytest.mark.parametrize("layout", ["bfl", "bfl-prefixed", "diffusers"])
def test_pretrained_loads_on_meta_from_each_layout(tmp_path, layout):
    model = random_flux(guidance=True)
    sd = model.state_dict()
    if layout == "diffusers":
        diffusers_twin(model).save_pretrained(tmp_path / "transformer")
        ref = str(tmp_path)
    else:
        prefix = "model.diffusion_model." if layout == "bfl-prefixed" else ""
        save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "flux1-dev.safetensors"))
        ref = str(tmp_path / "flux1-dev.safetensors") if layout == "bfl" else str(tmp_path)
    loaded = build_flux(FluxConfig(flavor="flux-debug", guidance_embed=True, pretrained=ref), attention=model.attention)
    got = loaded.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())


def test_loading_names_every_problem():
    model = random_flux()
    sd = dict(model.state_dict())
    sd.pop("double_blocks.0.img_attn.qkv.bias")
    sd["single_blocks.0.extra.weight"] = torch.zeros(1)
    sd["img_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(MinfmError) as err:
        check_state_dict(model, sd, source="x.safetensors")
    msg = str(err.value)
    assert "x.safetensors" in msg
    assert "missing keys: double_blocks.0.img_attn.qkv.bias" in msg
    assert "unexpected keys: single_blocks.0.extra.weight" in msg
    assert "img_in.weight (3, 3) (model wants (128, 64))" in msg


def test_pretrained_with_wrong_flavor_refuses(tmp_path):
    save_file({k: v.contiguous() for k, v in random_flux().state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(MinfmError, match="missing keys: guidance_in"):
        build_flux(FluxConfig(flavor="flux-debug", guidance_embed=True, pretrained=str(tmp_path / "w.safetensors")))


def test_export_diffusers_cli_from_run_folder(tmp_path, capsys):
    from diffusers import FluxTransformer2DModel

    model = random_flux(guidance=True)
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "recipe.toml").write_text(
        '[model.denoiser]\nname = "flux"\nflavor = "flux-debug"\nguidance_embed = true\n'
    )
    assert main(["export", "diffusers", str(run), str(tmp_path / "out")]) == 0
    ref = FluxTransformer2DModel.from_pretrained(str(tmp_path / "out")).eval()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["axes_dims_rope"] == [8, 12, 12]
    _outputs_match(model, ref, guidance=True)


def test_export_diffusers_cli_file_with_flavor_and_errors(tmp_path, capsys):
    model = random_flux()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert main(["export", "diffusers", str(path), str(tmp_path / "no")]) == 2
    assert "pass --flavor" in capsys.readouterr().err
    assert main(["export", "diffusers", str(path), str(tmp_path / "bad"), "--flavor", "flux-tiny"]) == 2
    assert "shape mismatches: double_blocks.0.img_attn.norm.key_norm.scale (32,) (model wants (64,))" in capsys.readouterr().err
    assert main(["export", "diffusers", str(path), str(tmp_path / "ok"), "--flavor", "flux-debug", "--dtype", "bf16"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ok" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("x_embedder.weight").dtype == torch.bfloat16


def test_export_replaces_links_in_its_output_folder_never_writing_through(tmp_path, capsys):
    """An export over an old one replaces each file whole (temp file + rename): a link planted at
    an output name is replaced, and the file it pointed at keeps its bytes."""
    model = random_flux()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("precious")
        (out / name).symlink_to(victims[name])
    assert main(["export", "diffusers", str(path), str(out), "--flavor", "flux-debug"]) == 0, capsys.readouterr().err
    for name, victim in victims.items():
        assert victim.read_text() == "precious"
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 8
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
