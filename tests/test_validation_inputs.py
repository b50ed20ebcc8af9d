"""Bad inputs end in one clean line (exit 2), bugs in a traceback plus a request to report
them (exit 1): the error boundary of `minfm` (issue 16), and recipes from outside read as
data (issue 15: no ${VAR} expansion, references contained in their folder)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from minfm_core import hookimpl
from minfm_core.cli.main import checkpoint_error_line, main
from minfm_core.errors import MinfmError, RecipeError
from minfm_core.plugins import plugin
from minfm_core.recipe import load_recipe, load_recipe_dict

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = str(ROOT / "recipes" / "quickstart.toml")


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minfm: error: "), err
    return lines[0]


# ---- recipe files ------------------------------------------------------------------------
def test_binary_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"job = \"train\"\n\xff\xfe\x00\x01binary")
    line = one_line_error(capsys, ["check", str(bad)])
    assert str(bad) in line and "UTF-8" in line


def test_array_nested_5000_deep(tmp_path, capsys):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    line = one_line_error(capsys, ["check", str(deep)])
    assert str(deep) in line and "nested too deeply" in line


def test_recipe_that_is_a_folder(tmp_path, capsys):
    assert "is not a file" in one_line_error(capsys, ["check", str(tmp_path)])


def test_extends_cycle_through_a_symlink(tmp_path, capsys):
    a = tmp_path / "a.toml"
    a.write_text('extends = "link.toml"\n')
    (tmp_path / "link.toml").symlink_to(a)
    assert "circular extends" in one_line_error(capsys, ["check", str(a)])


@pytest.mark.parametrize("text", ["${HOME", "a ${1}", "x${"])
def test_unclosed_env_reference(tmp_path, capsys, text):
    r = tmp_path / "r.toml"
    r.write_text(f'extends = "{QUICKSTART}"\n[sample]\nneg_prompt = "{text}"\n')
    line = one_line_error(capsys, ["check", str(r)])
    assert "sample.neg_prompt: malformed environment reference" in line


def test_closed_env_reference_still_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("MINFM_TEST_NEG", "blurry")
    r = tmp_path / "r.toml"
    r.write_text(f'extends = "{QUICKSTART}"\n[sample]\nneg_prompt = "${{MINFM_TEST_NEG}}, ${{NOPE_X:-dark}}"\n')
    assert load_recipe(r).recipe.sample.neg_prompt == "blurry, dark"


# ---- rules that used to be run-only --------------------------------------------------------
@pytest.mark.parametrize(("setting", "path"), [
    ("train.total_batch_size=7", "train.total_batch_size"),   # not a multiple of batch 32 x 1
    ("train.min_lr=0.1", "train.min_lr"),                     # above lr
    ("train.batch_size=0", "train.batch_size"),
    ("run.seed=-1", "run.seed"),
    ("sample.batch_size=0", "sample.batch_size"),
    ("sample.guidance.scale=inf", "sample.guidance.scale"),
    ("sample.size=[1, 33, 32]", "sample.size"),                # not a multiple of the 1x2 patch
])
def test_check_refuses_what_run_refuses(capsys, setting, path):
    assert f"{path}: " in one_line_error(capsys, ["check", QUICKSTART, "--set", setting])


def test_flux_without_blocks(capsys):
    line = one_line_error(capsys, ["check", QUICKSTART, "--set", "model.denoiser.n_ds_blocks=0",
                                   "--set", "model.denoiser.n_ss_blocks=0"])
    assert "model.denoiser.n_ss_blocks: n_ds_blocks + n_ss_blocks must be at least 1" in line


def test_train_job_without_data(tmp_path, capsys):
    import re

    r = tmp_path / "r.toml"
    r.write_text(re.sub(r"(?ms)^\[data\].*?(?=^\[)", "", Path(QUICKSTART).read_text()))
    assert "data: a train job needs a [data] table" in one_line_error(capsys, ["check", str(r)])


def test_exp_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    line = one_line_error(capsys, ["check", QUICKSTART, "--set", f"run.exp_dir={f}"])
    assert "run.exp_dir" in line and str(f) in line


@pytest.mark.parametrize("n", ["0", "-3"])
def test_world_size_must_be_positive(capsys, n):
    assert "--world-size" in one_line_error(capsys, ["check", QUICKSTART, "--world-size", n])


def test_world_size_divides_total_batch(capsys):
    # 64 = 32 x 2: fine at world size 2, refused at 3 (the rule the trainer applies).
    fsdp = "parallel.name=fsdp2"
    assert main(["check", QUICKSTART, "--set", fsdp, "--set", "train.total_batch_size=64", "--world-size", "2"]) == 0
    capsys.readouterr()
    line = one_line_error(capsys, ["check", QUICKSTART, "--set", fsdp, "--set", "train.total_batch_size=64",
                                   "--world-size", "3"])
    assert "train.total_batch_size: 64 is not a positive multiple" in line


# ---- eval extractors -----------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "why"), [
    ("os:system", "standard-library"),
    ("builtins:print", "standard-library"),
    ("eval_helpers:images", "callable without arguments"),
    ("eval_helpers:np", "expected a Python function or class"),
    ("eval_helpers:nope", "has no attribute"),
    ("not a spec", "expected MODULE:ATTR"),
])
def test_eval_extractor_specs_are_refused_before_running(tmp_path, capsys, spec, why):
    from eval_helpers import images, save_npz

    npz = save_npz(tmp_path / "s.npz", images(4, 0))
    line = one_line_error(capsys, ["eval", "imagenet", npz, "--ref", npz, "--extractor", spec])
    assert "--extractor" in line and why in line


# ---- the boundary itself -----------------------------------------------------------------
class _Commands:
    """A real plugin adding commands that fail the ways the boundary must handle."""

    @hookimpl
    def register_commands(self, subparsers):
        p = subparsers.add_parser("boundary-oserror")
        p.add_argument("path")
        p.set_defaults(func=lambda a: Path(a.path).write_text("x"))
        p = subparsers.add_parser("boundary-bug")
        p.set_defaults(func=lambda a: {}["missing"])
        p = subparsers.add_parser("boundary-dcp")
        p.add_argument("path")
        p.set_defaults(func=_load_truncated_checkpoint)


def _load_truncated_checkpoint(args):
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(3)}, checkpoint_id=args.path)
    for f in Path(args.path).glob("*.distcp"):
        f.write_bytes(b"")
    dcp.load({"w": torch.zeros(3)}, checkpoint_id=args.path)


def test_os_error_is_one_line_naming_the_file(tmp_path, capsys):
    target = tmp_path / "no-such-dir" / "out.txt"
    with plugin(_Commands(), "boundary-test"):
        line = one_line_error(capsys, ["boundary-oserror", str(target)])
        # the plugin's own command: its user error names it, as every plugin's does
        assert line == f"minfm: error: {target}: No such file or directory (raised in plugin 'boundary-test')"
        line = one_line_error(capsys, ["boundary-oserror", str(tmp_path)])
        assert line == f"minfm: error: {tmp_path}: Is a directory (raised in plugin 'boundary-test')"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_exception_is_one_line(tmp_path, capsys):
    with plugin(_Commands(), "boundary-test"):
        line = one_line_error(capsys, ["boundary-dcp", str(tmp_path / "ckpt")])
    assert line.startswith("minfm: error: checkpoint") and "rank 0" in line


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_error_line_names_the_checkpoint_when_known(tmp_path):
    try:
        _load_truncated_checkpoint(type("A", (), {"path": str(tmp_path / "c")}))
    except BaseException as exc:  # CheckpointException derives from BaseException
        exc.checkpoint_path = tmp_path / "c"
        assert checkpoint_error_line(exc).startswith(f"checkpoint {tmp_path / 'c'}: ")
    else:
        pytest.fail("a truncated checkpoint loaded")


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(capsys):
    with plugin(_Commands(), "boundary-test"):
        rc = main(["boundary-bug"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "KeyError" in err
    assert err.strip().splitlines()[-1] == (
        "minfm: this is a bug in plugin 'boundary-test', whose code raised it; please report it to its authors "
        "with the traceback above")  # the lambda that raised is in this module


def test_subprocess_binary_recipe_exit_code(tmp_path, minfm):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(os.urandom(64) + b"\xff")
    out = minfm("check", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ---- recipes from outside ------------------------------------------------------------------
def _repo(tmp_path: Path) -> Path:
    """A model folder as a Hub repo would bring it: a recipe extending a base in the repo."""
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "base.toml").write_text(Path(QUICKSTART).read_text())
    (repo / "prompts.txt").write_text("a red circle\n")
    (repo / "configs" / "recipe.toml").write_text(
        'extends = "../base.toml"\n[sample]\nneg_prompt = "${HF_TOKEN:-none} ${HOME}"\nprompt_file = "../prompts.txt"\n'
    )
    return repo


def test_untrusted_recipe_is_not_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecretsecretsecret0")
    repo = _repo(tmp_path)
    resolved = load_recipe(repo / "configs" / "recipe.toml", untrusted_root=repo)
    assert resolved.recipe.sample.neg_prompt == "${HF_TOKEN:-none} ${HOME}"
    assert resolved.recipe.sample.prompt_file == str(repo / "prompts.txt")
    raw = load_recipe_dict(repo / "configs" / "recipe.toml", untrusted_root=repo)
    assert raw["sample"]["neg_prompt"] == "${HF_TOKEN:-none} ${HOME}"
    # The same file from the user's own disk is theirs: expanded.
    assert "hf_secret" in load_recipe(repo / "configs" / "recipe.toml").recipe.sample.neg_prompt


@pytest.mark.parametrize("extends", ["../../x.toml", "/etc/hosts", "~/x.toml"])
def test_untrusted_extends_must_stay_inside(tmp_path, extends):
    repo = _repo(tmp_path)
    (tmp_path / "x.toml").write_text('job = "train"\n')
    r = repo / "configs" / "recipe.toml"
    r.write_text(f'extends = "{extends}"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(r, untrusted_root=repo)
    assert "extends: refusing path" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("setting", "field"), [
    ('prompt_file = "/etc/hostname"', "sample.prompt_file"),
    ('prompt_file = "../../../outside.txt"', "sample.prompt_file"),
    ('prompt_file = "escape.txt"', "sample.prompt_file"),          # a symlink leading out
])
def test_untrusted_file_references_must_stay_inside(tmp_path, setting, field):
    repo = _repo(tmp_path)
    (tmp_path / "outside.txt").write_text("secret\n")
    (repo / "configs" / "escape.txt").symlink_to(tmp_path / "outside.txt")
    r = repo / "configs" / "recipe.toml"
    r.write_text(f'extends = "../base.toml"\n[sample]\n{setting}\n')
    with pytest.raises(MinfmError) as info:
        load_recipe(r, untrusted_root=repo)
    assert f"{field}: refusing path" in str(info.value) and "\n" not in str(info.value)


def test_untrusted_training_inputs_outside_are_dropped_but_users_override_is_trusted(tmp_path):
    """What a published model was trained on (an absolute data root) is never read when it is
    sampled: dropped, not refused, so the model stays usable; the path is never opened."""
    repo = _repo(tmp_path)
    r = repo / "configs" / "recipe.toml"
    r.write_text('extends = "../base.toml"\n[data]\nname = "image_folder"\nroot = "/data/imgs"\n'
                 '[train]\nfid_ref = "/etc/passwd"\n')
    resolved = load_recipe(r, untrusted_root=repo)
    assert resolved.config("data").root == "" and resolved.recipe.train.fid_ref is None
    resolved = load_recipe(r, ["data.root=/data/mine"], untrusted_root=repo)
    assert resolved.config("data").root == "/data/mine"


def test_untrusted_recipe_in_a_hub_cache_layout(tmp_path):
    """Snapshot files are symlinks into blobs/: extends resolves from the recipe's place in
    the snapshot, not from the blob it points at."""
    cache = tmp_path / "hub" / "models--org--model"
    blobs, snap = cache / "blobs", cache / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    (snap / "configs").mkdir(parents=True)
    files = {
        "base.toml": Path(QUICKSTART).read_text(),
        "prompts.txt": "a blue square\n",
        "configs/recipe.toml": 'extends = "../base.toml"\n[sample]\nprompt_file = "../prompts.txt"\n'
                               'neg_prompt = "${HOME}"\n',
    }
    for i, (name, text) in enumerate(files.items()):
        blob = blobs / f"{i:040x}"
        blob.write_text(text)
        (snap / name).symlink_to(os.path.relpath(blob, (snap / name).parent))
    resolved = load_recipe(snap / "configs" / "recipe.toml", untrusted_root=snap)
    assert resolved.recipe.sample.neg_prompt == "${HOME}"
    assert Path(resolved.recipe.sample.prompt_file).read_text() == "a blue square\n"
    assert resolved.recipe.train.max_steps == 500  # from base.toml, found through the snapshot


def test_export_reads_the_recipe_of_a_downloaded_folder_as_data(tmp_path, monkeypatch):
    from minfm_core.safepath import SOURCE_MARKER
    from minfm_plugins.flux.export import config_from_recipe

    monkeypatch.setenv("MINFM_TEST_DMODEL", "64")
    (tmp_path / SOURCE_MARKER).write_text("{}")  # what hub pull leaves in a folder it downloaded
    r = tmp_path / "recipe.toml"
    r.write_text('[model.denoiser]\nname = "flux"\nflavor = "${MINFM_TEST_DMODEL}"\n')
    with pytest.raises(MinfmError, match=r"\$\{MINFM_TEST_DMODEL\}"):  # literal, so not a flavor
        config_from_recipe(r)
    r.write_text('extends = "../x.toml"\n')
    with pytest.raises(RecipeError, match="extends: refusing path"):
        config_from_recipe(r)
    (tmp_path / SOURCE_MARKER).unlink()  # the user's own folder: their recipe, as written
    r.write_text('[model.denoiser]\nname = "flux"\nflavor = "${MINFM_TEST_FLAVOR:-flux-debug}"\n')
    assert config_from_recipe(r).flavor == "flux-debug"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
