"""Golden tests: the exact text of recipe errors (contract: users and docs rely on it)."""

from __future__ import annotations

import json
import textwrap

import pytest

from minfm_core.errors import MinfmError, RecipeError
from minfm_core.recipe import load_recipe_dict, resolve_recipe


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(raw, registry):
    with pytest.raises(RecipeError) as info:
        resolve_recipe(raw, source="r.toml", registry=registry)
    return info.value.problems


def test_unknown_key_with_suggestion(toy_registry):
    raw = {"model": {"denoiser": {"name": "flux", "d_hed": 64}}}
    assert problems(raw, toy_registry) == ["model.denoiser: unknown key 'd_hed' (did you mean 'd_head'?)"]


def test_unknown_section_key(toy_registry):
    raw = {"model": {"denoiser": "flux"}, "train": {"max_step": 5}}
    assert problems(raw, toy_registry) == ["train: unknown key 'max_step' (did you mean 'max_steps'?)"]


def test_wrong_type(toy_registry):
    raw = {"model": {"denoiser": {"name": "flux", "d_head": "sixty-four"}}}
    assert problems(raw, toy_registry) == ["model.denoiser.d_head: expected int, got 'sixty-four'"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "train.max_steps: expected int, got 1.5"),
        (True, "train.max_steps: expected int, got True"),
        ("100", "train.max_steps: expected int, got '100'"),
        # TOML's integers are 64-bit; Python's TOML parser (and --set) take any size.
        (2**63, "train.max_steps: expected a 64-bit integer (as TOML has), got 9223372036854775808"),
    ],
)
def test_ints_are_strict(toy_registry, value, message):
    raw = {"model": {"denoiser": "flux"}, "train": {"max_steps": value}}
    assert problems(raw, toy_registry) == [message]


def test_64_bit_bounds_hold_for_every_int(toy_registry):
    raw = {"model": {"denoiser": "flux"}, "run": {"seed": -(2**63) - 1}, "sample": {"size": [1, 2**64, 16]}}
    assert problems(raw, toy_registry) == [
        "run.seed: expected a 64-bit integer (as TOML has), got -9223372036854775809",
        "sample.size[1]: expected a 64-bit integer (as TOML has), got 18446744073709551616",
    ]


def test_exp_dir_cannot_be_empty(toy_registry):
    # "" would be the current folder: checkpoints and samples spread over wherever minfm started.
    for blank in ("", "  "):
        raw = {"model": {"denoiser": "flux"}, "run": {"exp_dir": blank}}
        assert problems(raw, toy_registry) == [f"run.exp_dir: must not be empty, got {blank!r}"]


def test_literal_choice(toy_registry):
    raw = {"model": {"denoiser": {"name": "flux", "act": "gelo"}}}
    assert problems(raw, toy_registry) == [
        "model.denoiser.act: expected one of 'gelu', 'silu', got 'gelo' (did you mean 'gelu'?)"
    ]


def test_validator_message_is_kept(toy_registry):
    raw = {"model": {"denoiser": "flux"}, "flow": {"time_sampler": {"name": "logit_normal", "sigma": -1.0}}}
    (msg,) = problems(raw, toy_registry)
    assert msg.startswith("flow.time_sampler: 'sigma' must be > 0: -1.0")


def test_unknown_component(toy_registry):
    raw = {"model": {"denoiser": "flux"}, "flow": {"time_sampler": {"name": "logit_norml"}}}
    assert problems(raw, toy_registry) == [
        "flow.time_sampler.name: unknown time_sampler 'logit_norml' (did you mean 'logit_normal'?); "
        "installed: logit_normal, uniform"
    ]


def test_missing_required_section(toy_registry):
    assert problems({}, toy_registry) == ["model: missing required key"]


def test_component_table_without_name(toy_registry):
    raw = {"model": {"denoiser": {"d_head": 64}}}
    assert problems(raw, toy_registry) == [
        "model.denoiser: component table has no 'name' key (the registry name of the component)"
    ]


def test_all_problems_reported_together(toy_registry):
    raw = {
        "model": {"denoiser": {"name": "flux", "d_head": "x"}, "vae": {"name": "identity", "chans": 3}},
        "flow": {"time_sampler": "nope"},
    }
    assert len(problems(raw, toy_registry)) == 3


def test_cross_check_d_img(toy_registry):
    raw = {"model": {"denoiser": {"name": "flux", "d_img": 48}}}
    assert problems(raw, toy_registry) == [
        "model.denoiser.d_img: 48 does not match the VAE's 16 latent channels x patch (1, 2, 2) = 64"
    ]


def test_cross_check_rope_axes(toy_registry):
    raw = {"model": {"denoiser": {"name": "flux", "rope_axes": [8, 28, 20]}}}
    assert problems(raw, toy_registry) == ["model.denoiser.rope_axes: sum 56 must equal d_head = 64"]


def test_cross_check_world_size(toy_registry):
    raw = {"model": {"denoiser": "flux"}, "parallel": {"name": "fsdp2", "shard_size": 4}}
    with pytest.raises(RecipeError) as info:
        resolve_recipe(raw, registry=toy_registry, world_size=6)
    assert info.value.problems == ["parallel.shard_size: world size 6 is not divisible by shard_size 4"]
    resolve_recipe(raw, registry=toy_registry, world_size=8)


def test_bad_set_syntax():
    with pytest.raises(RecipeError) as info:
        load_recipe_dict_from_text("", ["train.max_steps"])
    assert str(info.value) == "--set 'train.max_steps': expected KEY=VALUE with a dotted key, e.g. train.max_steps=100"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(tmp_path / "nope.toml")
    assert str(info.value) == f"recipe file not found: {tmp_path / 'nope.toml'}"


def test_a_recipe_link_to_nothing_says_so(tmp_path):
    """A dangling link or a loop of links was "not found", though `ls` lists it."""
    (tmp_path / "a.toml").symlink_to(tmp_path / "b.toml")
    (tmp_path / "b.toml").symlink_to(tmp_path / "a.toml")
    (tmp_path / "c.toml").symlink_to(tmp_path / "gone.toml")
    for name in ("a.toml", "c.toml"):
        with pytest.raises(RecipeError) as info:
            load_recipe_dict(tmp_path / name)
        assert str(info.value) == f"recipe file is a link to nothing (or a loop of links): {tmp_path / name}"


def test_missing_extended_file(tmp_path):
    write(tmp_path, "a.toml", 'extends = "base.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(tmp_path / "a.toml")
    assert str(info.value) == f"recipe file not found: {tmp_path / 'base.toml'} (extended from {tmp_path / 'a.toml'})"


def test_circular_extends(tmp_path):
    write(tmp_path, "a.toml", 'extends = "b.toml"\n')
    write(tmp_path, "b.toml", 'extends = "c.toml"\n')
    write(tmp_path, "c.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(tmp_path / "a.toml")
    assert str(info.value) == f"{tmp_path / 'a.toml'}: circular extends: a.toml -> b.toml -> c.toml -> a.toml"


def test_a_long_extends_chain_is_named_as_one(tmp_path):
    """A generated chain of 1,500 files ran out of recursion and read as one file's tables
    "nested too deeply"; 64 files is the most, and the error says it is the chain."""
    from minfm_core.recipe.load import MAX_EXTENDS_DEPTH

    n = MAX_EXTENDS_DEPTH
    for i in range(n):
        write(tmp_path, f"r{i}.toml", f'extends = "r{i + 1}.toml"\n')
    write(tmp_path, f"r{n}.toml", "[train]\nmax_steps = 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(tmp_path / "r0.toml")
    assert str(info.value) == (f"{tmp_path / 'r0.toml'}: extends: a chain of more than {n} recipes "
                               f"(r0.toml -> r1.toml -> ... -> r{n}.toml); at most {n}")
    assert load_recipe_dict(tmp_path / "r1.toml")["train"]["max_steps"] == 3  # 64 files: read


def test_invalid_toml(tmp_path):
    write(tmp_path, "bad.toml", "[model\n")
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(tmp_path / "bad.toml")
    assert str(info.value).startswith(f"{tmp_path / 'bad.toml'}: invalid TOML: ")


def test_unset_env_var(tmp_path, monkeypatch):
    monkeypatch.delenv("MINFM_TEST_UNSET", raising=False)
    write(tmp_path, "r.toml", '[run]\nexp_dir = "${MINFM_TEST_UNSET}/x"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(tmp_path / "r.toml")
    assert str(info.value) == (
        f"{tmp_path / 'r.toml'}: run.exp_dir: environment variable MINFM_TEST_UNSET is not set "
        "(or write ${MINFM_TEST_UNSET:-default})"
    )


def load_recipe_dict_from_text(text, overrides, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.toml"
        p.write_text(text)
        return load_recipe_dict(p, overrides)


def test_sample_frames_the_model_cannot_draw_are_refused_before_work(minfm, tmp_path):
    """Training galleries draw sample.size too: a bad frame count fails `minfm check` and
    `minfm run` at once, not at the first gallery."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "minfm:quickstart.toml"\n[model.patchifier]\npatch_size = [2, 2, 2]\n'
                      '[model.denoiser]\nd_img = 24\n[sample]\nsize = [3, 32, 32]\n'
                      f'[run]\nexp_dir = "{tmp_path / "exp"}"\n')
    for cmd in ("check", "run"):
        res = minfm(cmd, str(recipe))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert ("sample.size 3x32x32: 3 frames: this model cannot draw that (its patches span 2 latent frames); "
                "valid frame counts are 2, 4, 6, 8, 10, ...") in res.stderr
    assert not (tmp_path / "exp").exists()
    recipe.write_text(recipe.read_text().replace("size = [3, 32, 32]", "size = [4, 32, 32]"))
    # (with clips to train on: the quickstart's pictures are 1 frame, which this patch cannot cut)
    res = minfm("check", str(recipe), "--set", 'data={name = "moving_shapes", frames = 4}')
    assert res.returncode == 0, res.stderr


def test_a_load_plan_is_checked_without_init_from(toy_registry):
    # Unused until init_from is set, but a typo all the same: refused with the recipe, not when it is first needed.
    raw = {"model": {"denoiser": "flux"}, "train": {"init_load_plan": "ema:model,optimiser:optimizer"}}
    assert problems(raw, toy_registry) == [
        "train.init_load_plan: unknown part 'optimiser' (did you mean 'optimizer'?); "
        "parts: model, ema, optimizer, scheduler, step"
    ]


@pytest.mark.parametrize("override", [
    "train.max_steps=5\n[other]\nx=1",
    'sample.neg_prompt="x"\nv2 = 1',
    "run.exp_dir=a\nb",
], ids=["table-after", "key-after", "bare-lines"])
def test_a_set_value_is_one_value_not_a_toml_document(override):
    from minfm_core.recipe.load import parse_override

    with pytest.raises(RecipeError, match="VALUE is one TOML value"):
        parse_override(override)
    assert parse_override('sample.neg_prompt="""two\nlines"""')[1] == "two\nlines"  # a quoted one may span lines
    assert parse_override("train.x=[1,\n2]")[1] == [1, 2]


@pytest.mark.parametrize("where, text", [
    ("--set", 'run.exp_dir="a\\u0000b"'),
    ("file", 'name = "x\\u0000"'),
])
def test_a_nul_in_a_recipe_string_is_refused_with_its_path(tmp_path, capsys, where, text):
    from minfm_core.cli.main import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "minfm:quickstart.toml"\n' + ("[sample.guidance]\n" + text + "\n" if where == "file" else ""))
    argv = ["check", str(recipe)] + (["--set", text] if where == "--set" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    path = "run.exp_dir" if where == "--set" else "sample.guidance.name"
    assert f"{path}: a NUL character in" in err and "Traceback" not in err, err


def test_init_from_problems_are_found_by_check(tmp_path, capsys):
    from minfm_core.cli.main import main

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "minfm:quickstart.toml"\n[run]\nexp_dir = "{tmp_path / "run"}"\n')
    assert main(["check", str(recipe), "--set", "train.init_from=org/name"]) == 2
    assert "train.init_from: org/name: no such file or folder (a Hub repo is hf://org/name)" in capsys.readouterr().err
    assert main(["check", str(recipe), "--set", f"train.init_from={tmp_path}", "--set", 'train.init_load_plan=""']) == 2
    assert "train.init_load_plan: empty, so nothing would be loaded" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # resuming: init_from is not read
    assert main(["check", str(recipe), "--set", "train.init_from=org/name"]) == 0


@pytest.mark.parametrize("override, message", [
    ("model=[1,2]", "model: expected a table (ModelSection)"),
    ("train=5", "train: expected a table (TrainSection)"),
    ("train." + "k" * 300 + "=1", "unknown key '" + "k" * 80 + "'..."),
])
def test_structure_errors_read_well(override, message):
    from minfm_core.recipe.load import apply_overrides

    with pytest.raises(RecipeError) as info:
        resolve_recipe(apply_overrides(load_recipe_dict("minfm:quickstart.toml"), [override]))
    assert message in str(info.value) and len(str(info.value)) < 400


def test_an_invalid_default_is_called_the_default():
    from minfm_core.config import config, field, structure
    from minfm_core.validators import Range

    @config
    class Probe:
        k: int = field(0, doc="a plugin's default outside its own range", validator=Range(1, 10))

    with pytest.raises(RecipeError) as info:
        structure({}, Probe, path="data")
    assert str(info.value) == "data.k: must be in [1, 10], got 0 (the default: the recipe does not set it)"
    with pytest.raises(RecipeError) as info:
        structure({"k": 0}, Probe, path="data")
    assert str(info.value) == "data.k: must be in [1, 10], got 0"


@pytest.mark.parametrize("error", [ValueError, MinfmError])
def test_a_rule_between_fields_reads_as_its_fields_path(error):
    """docs/plugins.md: __attrs_post_init__ raises ValueError or MinfmError, its message led
    by the field's name. A MinfmError read `data: MinfmError: sizes: ...`."""
    from minfm_core.config import config, field, structure

    @config
    class Probe:
        size: int = field(32, doc="a side")
        multiple: int = field(16, doc="what sides are multiples of")

        def __attrs_post_init__(self):
            if self.size % self.multiple:
                raise error(f"size: {self.size} is not a multiple of multiple={self.multiple}")

    with pytest.raises(RecipeError) as info:
        structure({"size": 40}, Probe, path="data")
    assert str(info.value) == "data.size: 40 is not a multiple of multiple=16"


def test_check_refuses_cached_latents_without_their_folder(capsys):
    from minfm_core.cli.main import main

    assert main(["check", "minfm:quickstart.toml", "--set", "data.use_cached_latents=true"]) == 2
    assert "data.latents_dir: use_cached_latents = true needs the folder" in capsys.readouterr().err


def _datasets_with(field: str) -> list[str]:
    """``data = {...}`` tables (a root where the dataset has one) for every dataset with ``field``."""
    import attrs

    from minfm_core.registry import get_registry

    out = []
    for c in get_registry().components("dataset"):
        fields = attrs.fields_dict(c.config) if attrs.has(c.config) else {}
        if field in fields:
            out.append(f"name = '{c.name}'" + (", root = '/tmp'" if "root" in fields else ""))
    return out


WAN = ["--set", 'model.vae.name="wan"', "--set", 'model.vae.pretrained=""', "--set", "model.vae.base_dim=8",
       "--set", "model.vae.z_dim=4", "--set", "model.denoiser.d_img=16", "--set", "model.patchifier.vae_compression=[4,8,8]",
       "--set", "sample.size=[5,16,16]"]


@pytest.mark.parametrize("name", _datasets_with("frames"))
def test_a_train_job_refuses_clip_lengths_the_vae_cannot_take(name, capsys):
    """They failed at the first batch, after the run folder and its recipe.toml were written."""
    from minfm_core.cli.main import main

    data = f"data={{{name}, frames = 6}}"
    assert main(["check", "minfm:quickstart_video.toml", "--set", data, *WAN]) == 2
    assert "data.frames: 6 frames: this model cannot draw that" in capsys.readouterr().err
    assert main(["check", "minfm:quickstart_video.toml", "--set", data.replace("6", "5"), *WAN]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", _datasets_with("size_multiple"))
def test_a_train_job_refuses_a_size_multiple_off_the_vae_grid(name, capsys):
    from minfm_core.cli.main import main

    data = f"data={{{name}, size_multiple = 4}}"
    assert main(["check", "minfm:quickstart_video.toml", "--set", data, *WAN]) == 2
    assert "data.size_multiple: 4 is not a multiple of the VAE's compression x patch = 16x16" in capsys.readouterr().err


def _datasets_with_a_root() -> list[str]:
    import attrs

    from minfm_core.registry import get_registry

    return [c.name for c in get_registry().components("dataset")
            if attrs.has(c.config) and "root" in attrs.fields_dict(c.config)]


@pytest.mark.parametrize("name", _datasets_with_a_root())
def test_a_train_job_refuses_a_dataset_without_its_root(name, capsys):
    """`minfm check` said ok and the run failed at the first dataset build, after its folder was
    made. A root missing on this machine stays a warning (the data may live elsewhere), and a
    sample job, or a recipe reading cached latents, needs no root."""
    from minfm_core.cli.main import main

    assert main(["check", "minfm:quickstart.toml", "--set", f"data={{name = '{name}'}}"]) == 2
    err = capsys.readouterr().err
    assert "data.root: a train job needs it set" in err and len(err.strip().splitlines()) == 1, err
    assert main(["check", "minfm:quickstart.toml", "--set", f"data={{name = '{name}', root = '/nonexistent/x'}}"]) == 0
    assert "data.root: /nonexistent/x does not exist (yet)" in capsys.readouterr().err
    assert main(["check", "minfm:quickstart.toml", "--set", f"data={{name = '{name}'}}", "--set", 'job="sample"',
                 "--set", 'model.denoiser.pretrained="org/name/flux.safetensors"']) == 0, capsys.readouterr().err
    cached = f"data={{name = '{name}', use_cached_latents = true, latents_dir = '/nonexistent/l'}}"
    assert main(["check", "minfm:quickstart.toml", "--set", cached]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("val_every, fid_every, missing", [(0, 0, []), (5, 0, ["val"]), (0, 5, ["val"]),
                                                           (5, 0, ["train", "val"])])
def test_check_warns_of_a_latent_split_the_run_reads_and_the_cache_lacks(tmp_path, capsys, val_every, fid_every,
                                                                          missing):
    """reproduce.md's prepare encoded the train split only, and the recipe validates on val:
    `minfm check` said ok, then `minfm run` stopped at start-up on the missing val/index.json."""
    from minfm_core.cli.main import main

    for split in {"train", "val"} - set(missing):
        (tmp_path / split).mkdir()
        (tmp_path / split / "index.json").write_text('{"entries": []}')
    fid = ["--set", f"train.fid_every={fid_every}", "--set", "train.fid_ref='ref.npz'"] if fid_every else []
    assert main(["check", "minfm:quickstart.toml", "--set", "data.use_cached_latents=true",
                 "--set", f"data.latents_dir={json.dumps(str(tmp_path))}", "--set", f"train.val_every={val_every}",
                 *fid]) == 0
    err = capsys.readouterr().err
    said = [s for s in ("train", "val") if f"has no {s}/index.json" in err]
    assert said == missing, err
    if missing:
        assert f"write it with `minfm cache latents RECIPE --out {tmp_path} --split {missing[-1]}`" in err
