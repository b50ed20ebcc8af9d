"""Values nested past Python's recursion limit and NUL characters in file names, wherever a
command reads TOML or JSON from the user or from outside: each is one clear error (or, for a
file the run only captions from, nothing), never a RecursionError or ValueError traceback."""

from __future__ import annotations

import pytest

from engine_helpers import TINY
from minfm_core.errors import MinfmError, RecipeError
from minfm_core.recipe import load_recipe

DEEP = "[" * 2000 + "]" * 2000


@pytest.fixture(autouse=True)
def default_recursion_limit():
    """The interpreter's default limit, which the CLI runs with (a test runner's worker may
    raise it: 2,000 levels then parse, and nothing is refused)."""
    import sys

    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(before)


def test_a_set_value_nested_too_deeply_is_refused_naming_the_key():
    with pytest.raises(RecipeError, match=r"--set train\.x: VALUE has arrays or tables nested too deeply"):
        load_recipe(TINY, [f"train.x={DEEP}"])
    assert load_recipe(TINY, ["train.max_steps=3"]).recipe.train.max_steps == 3  # a plain one still loads


def test_a_nul_in_extends_is_refused_naming_the_key(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "tiny.toml\\u0000"\n')
    with pytest.raises(RecipeError, match=r"r\.toml: extends: a NUL character in 'tiny\.toml\\x00'"):
        load_recipe(recipe, [])


def test_an_encoder_table_nested_too_deeply_is_refused():
    from minfm_plugins.data.imagenet_prepare import parse_encoder

    with pytest.raises(MinfmError, match=r"^--encoder: arrays or tables nested too deeply$"):
        parse_encoder("{a = " * 2000 + "1" + "}" * 2000)


def test_a_run_record_nested_too_deeply_is_no_recipe(tmp_path):
    from minfm_core.runlock import check_run_record

    record = tmp_path / "recipe.toml"
    record.write_text(f"x = {DEEP}\n")
    with pytest.raises(MinfmError, match=r"is no recipe minfm can read"):
        check_run_record(record)


@pytest.mark.parametrize("text", ["[1, 2", DEEP, '{"a": 1}', '["a red circle", 7]'],
                         ids=["cut_short", "deep", "object", "mixed"])
def test_a_damaged_gallery_prompts_file_captions_nothing_of_it(tmp_path, text):
    from minfm_core.engine.gallery import _step_prompts, write_training_index

    step = tmp_path / "step_00000002"
    step.mkdir()
    (step / "prompts.json").write_text(text)
    assert _step_prompts(step / "prompts.json") == (["a red circle"] if text.startswith('["a') else [])
    write_training_index(tmp_path)
    assert (tmp_path / "index.html").read_text().count("<h2>step_00000002</h2>") == 1
