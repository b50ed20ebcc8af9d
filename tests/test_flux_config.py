"""FLUX config: flavors give defaults, recipes override, errors name the field."""

import pytest

from minfm_core.config import structure
from minfm_core.errors import RecipeError
from minfm_core.registry import get_registry
from minfm_plugins.flux.config import FLAVORS, FluxConfig


def test_flavor_fills_unset_fields_and_overrides_win():
    cfg = structure({"flavor": "flux-tiny", "d_img": 12, "guidance_embed": True}, FluxConfig, "model.denoiser")
    assert (cfg.d_model, cfg.d_head, cfg.n_heads, cfg.rope_axes) == (1024, 64, 16, (8, 28, 28))
    assert (cfg.d_img, cfg.guidance_embed, cfg.d_txt, cfg.d_vec) == (12, True, 768, 768)


def test_every_flavor_is_complete_and_consistent():
    for name, values in FLAVORS.items():
        cfg = FluxConfig(flavor=name)
        assert sum(cfg.rope_axes) == cfg.d_head, name
        assert {k: getattr(cfg, k) for k in values} == values


def test_no_flavor_means_every_dimension_is_required():
    full = dict(FLAVORS["flux-debug"])
    assert FluxConfig(**full).d_model == 128
    full.pop("d_txt")
    with pytest.raises(RecipeError, match="model.denoiser: no flavor given, so these must be set: d_txt"):
        structure({k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}, FluxConfig, "model.denoiser")


@pytest.mark.parametrize(
    "table,message",
    [
        ({"flavor": "flux-tny"}, "model.denoiser.flavor: expected one of 'flux-debug', 'flux-tiny', 'flux-dev', got 'flux-tny' (did you mean 'flux-tiny'?)"),
        ({"flavor": "flux-tiny", "d_hed": 64}, "model.denoiser: unknown key 'd_hed' (did you mean 'd_head'?)"),
        ({"flavor": "flux-tiny", "d_head": "64"}, "model.denoiser.d_head: expected int, got '64'"),
        ({"flavor": "flux-tiny", "d_head": 60}, "model.denoiser.d_head: d_model 1024 is not a multiple of d_head 60"),
        ({"flavor": "flux-tiny", "rope_axes": [8, 28, 27]}, "model.denoiser.rope_axes: (8, 28, 27) must be 3 positive even numbers"),
    ],
)
def test_errors_name_the_field(table, message):
    with pytest.raises(RecipeError) as err:
        structure(table, FluxConfig, "model.denoiser")
    assert message in str(err.value)


def test_registered_with_config_and_attention_backends():
    reg = get_registry()
    comp = reg.get("denoiser", "flux")
    assert comp.config is FluxConfig and comp.plugin == "flux"
    assert reg.get("attention", "auto").plugin == "attention"


def test_mlp_ratio_must_give_a_hidden_unit():
    """d_mlp = int(d_model * mlp_ratio): 128 x 0.001 gave zero-width MLPs, trained silently."""
    for ratio in (0.001, 1 / 129):
        with pytest.raises(RecipeError, match=r"model\.denoiser\.mlp_ratio: .* x d_model 128 gives MLPs of width 0"):
            structure({"flavor": "flux-debug", "mlp_ratio": ratio}, FluxConfig, "model.denoiser")
    assert structure({"flavor": "flux-debug", "mlp_ratio": 1 / 128}, FluxConfig, "model.denoiser").d_mlp == 1


@pytest.mark.parametrize("args,name", [(["SRC", ""], "OUT_DIR"), (["", "out"], "SRC")])
def test_export_refuses_an_empty_path(tmp_path, monkeypatch, capsys, args, name):
    """`minfm export diffusers RUN ''` wrote into the current folder and printed "wrote ."."""
    from minfm_core.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "SRC").mkdir()
    assert main(["export", "diffusers", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minfm: error: {name}: empty value"]  # (the parser's rule for every text value)
    assert [p.name for p in tmp_path.iterdir()] == ["SRC"] and not any((tmp_path / "SRC").iterdir())


def test_export_flavor_is_for_weights_without_a_recipe(trained_run, tmp_path, capsys):
    """--flavor was used over a run's recipe.toml (the run's own flavor then broke the export), and a
    wrong one named a temporary file: `/tmp/minfm-export-XXXX/model.safetensors (FLUX model as
    configured): weights do not fit the model: ...`, never --flavor."""
    import shutil

    from minfm_core.checkpoint import export_for_hub
    from minfm_core.cli.main import main

    out = tmp_path / "out"
    assert main(["export", "diffusers", str(trained_run), str(out), "--flavor", "flux-debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"minfm: error: --flavor flux-debug: {trained_run} has a recipe.toml, which names the model; "
                   "leave --flavor out (it is for weights without one)"]
    assert not out.exists()
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(export_for_hub(trained_run, tmp_path / "exported") / "model.safetensors", bare / "weights.safetensors")
    weights = bare / "weights.safetensors"
    assert main(["export", "diffusers", str(weights), str(out), "--flavor", "flux-debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minfm: error: {weights} as --flavor flux-debug (FLUX model as "
                                               "configured): "), err
