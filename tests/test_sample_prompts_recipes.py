"""Prompt sets shipped as data, and the inference recipes that use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from minfm_core.cli.main import main
from minfm_core.engine.prompts import read_prompt_file
from minfm_core.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "recipes" / "prompts"


def test_imagenet_class_prompts_are_the_datasets_prompts():
    from minfm_plugins.data.imagenet import class_names

    classes = read_prompt_file(PROMPTS / "imagenet_1k_classes.txt")
    assert classes == class_names() and len(classes) == 1000
    assert classes[0] == "tench" and classes[999] == "toilet tissue"
    examples = read_prompt_file(PROMPTS / "imagenet_examples.txt")
    assert examples and set(examples) <= set(classes)  # the class_embedding table knows every one


def test_parti_prompts():
    prompts = read_prompt_file(PROMPTS / "parti_prompts.txt")
    assert len(prompts) == 1632  # PartiPrompts (P2)
    assert prompts[0] == "bond" and prompts[-1] == "a series of musical notes on a computer screen"
    assert "Salvador Dalí with a robotic half face" in prompts  # UTF-8 kept
    assert (PROMPTS / "README.md").read_text().count("Apache-2.0") >= 2  # sources noted beside the data


def test_recipes_point_at_shipped_prompt_files():
    for recipe in ("flux_dev_inference.toml", "flux_tiny_imagenet.toml"):
        prompt_file = load_recipe(ROOT / "recipes" / recipe).recipe.sample.prompt_file
        assert (ROOT / prompt_file).is_file(), recipe


def test_flux_dev_inference_checks_with_11_90b_denoiser(capsys):
    assert main(["check", str(ROOT / "recipes" / "flux_dev_inference.toml")]) == 0
    out = capsys.readouterr().out
    assert "model.denoiser" in out and "11,901,408,320 (11.90B)" in out
    resolved = load_recipe(ROOT / "recipes" / "flux_dev_inference.toml")
    t5, clip = resolved.config("model.text_encoder"), resolved.config("model.clip_encoder")
    # Safetensors folders of the FLUX.1-dev pipeline, with their sibling tokenizers.
    assert t5.pretrained_refs == ("black-forest-labs/FLUX.1-dev/text_encoder_2", "black-forest-labs/FLUX.1-dev/tokenizer_2")
    assert clip.pretrained_refs == ("black-forest-labs/FLUX.1-dev/text_encoder", "black-forest-labs/FLUX.1-dev/tokenizer")
    assert resolved.config("model.denoiser").guidance_embed and resolved.recipe.sample.distilled_guidance == 4.0


@pytest.mark.parametrize("recipe", ["flux_tiny_imagenet.toml", "quickstart.toml"])
def test_other_recipes_check(recipe, capsys):
    assert main(["check", str(ROOT / "recipes" / recipe)]) == 0


def _bad_prompt_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the reason the check must give)."""
    from minfm_core.engine.prompts import MAX_PROMPT_FILE_BYTES

    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")  # size 0, never ends
    with open(tmp_path / "huge.txt", "wb") as f:  # sparse: no disk used
        f.truncate(MAX_PROMPT_FILE_BYTES + 1)
    return {
        "missing": (tmp_path / "missing.txt", "prompt file: No such file or directory"),
        "not utf-8": (tmp_path / "latin1.txt", "prompt file: not UTF-8 text"),
        "no prompts": (tmp_path / "blank.txt", "prompt file has no prompts"),
        "too large": (tmp_path / "huge.txt", "is more than the 67,108,864 accepted"),
        "a folder": (tmp_path, "prompt file: not a regular file"),
        "a link to /dev/zero": (zero, "prompt file: not a regular file"),
    }


def test_a_prompt_file_the_job_will_read_is_read_by_the_check(tmp_path, capsys):
    """A training run meets its gallery prompt file at the first gallery, hours in: the check reads it first."""
    from engine_helpers import TINY

    galleries = ["--set", "train.sample_every=2", "--set", "sample.prompts=[]"]
    for name, (path, reason) in _bad_prompt_files(tmp_path).items():
        file = ["--set", f"sample.prompt_file={str(path)!r}"]
        for job in (["--set", 'job="sample"'], []):
            assert main(["check", str(TINY), *galleries, *file, *job]) == 2, name
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"minfm: error: {TINY}: sample.prompt_file: {path}: ") and reason in err, (name, err)
            assert "\n" not in err
        # A training run that never reads it: no galleries, or sample.prompts (which a gallery prefers).
        assert main(["check", str(TINY), *file]) == 0, name
        assert main(["check", str(TINY), "--set", "train.sample_every=2", *file]) == 0, name
        capsys.readouterr()


@pytest.mark.parametrize("line, problem", [
    ("a\x00b", "line 2: a NUL character"),
    ("x" * 70_000, "line 2: 70,000 characters, more than 65,536"),
])
def test_a_prompt_file_line_no_prompt_is_refused_by_its_number(tmp_path, line, problem):
    """A 10 MB line was copied whole into metadata.json and index.html; a NUL went through
    (recipes refuse both)."""
    from minfm_core.errors import MinfmError

    path = tmp_path / "prompts.txt"
    path.write_text(f"a red circle\n{line}\n")
    with pytest.raises(MinfmError) as info:
        read_prompt_file(path)
    assert str(info.value) == f"{path}: {problem}"
    path.write_text("a red circle\n" + "x" * 65_536 + "\n")
    assert [len(p) for p in read_prompt_file(path)] == [12, 65_536]


def test_recipe_prompts_past_the_limit_are_refused_by_their_place(capsys):
    from minfm_core.errors import RecipeError

    tiny = Path(__file__).parent / "recipes" / "tiny.toml"
    with pytest.raises(RecipeError, match=r"sample\.prompts: prompt 1: 70,000 characters, more than 65,536"):
        load_recipe(tiny, [f'sample.prompts=["a", "{"y" * 70_000}"]'])
    with pytest.raises(RecipeError, match=r"sample\.neg_prompt: 65,537 characters, more than 65,536"):
        load_recipe(tiny, [f'sample.neg_prompt="{"n" * 65_537}"'])
