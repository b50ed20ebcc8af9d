"""A config made in Python checks each field's type where it is made (minfm_core.config).

Recipes are checked while they are structured; a config written in Python used to take any
value, and ``RectifiedConfig(compute_dtype="fp64")`` failed only when the component built (a
KeyError). Cases come from the registry and the recipe schema: every config class, every field.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from minfm_core.config import FieldTypeError, fits_type
from minfm_core.errors import RecipeError
from minfm_core.recipe import load_recipe
from minfm_core.recipe.schema import Recipe
from minfm_core.registry import KINDS, get_registry

TINY = Path(__file__).resolve().parent / "recipes" / "tiny.toml"


def _config_classes() -> list[type]:
    found: list[type] = []
    visited: set[type] = set()
    todo = [Recipe] + [c.config for kind in KINDS for name in get_registry().names(kind)
                       if (c := get_registry().get(kind, name)).config is not None]
    while todo:
        cls = todo.pop()
        if cls in visited:
            continue
        visited.add(cls)
        attrs.resolve_types(cls)
        if all("doc" in f.metadata for f in attrs.fields(cls)):  # made with field(): not the slot record Spec
            found.append(cls)
        for f in attrs.fields(cls):  # nested configs (a section, a flavor table)
            for tp in (f.type, *getattr(f.type, "__args__", ())):
                if isinstance(tp, type) and attrs.has(tp):
                    todo.append(tp)
    return found


#: Of no field's type: not a number, string, bool, tuple, None or config.
ALIEN = object()
CASES = [(cls, f.name) for cls in _config_classes() for f in attrs.fields(cls) if not fits_type(f.type, ALIEN)]


def test_the_cases_cover_the_registry_and_the_schema():
    names = {cls.__name__ for cls, _ in CASES}
    assert {"RectifiedConfig", "LogitNormalTimeConfig", "TrainSection", "SampleSection"} <= names
    assert len(CASES) > 150


@pytest.mark.parametrize(("cls", "field"), CASES, ids=[f"{c.__name__}.{f}" for c, f in CASES])
def test_every_field_checks_its_type_first(cls, field):
    attribute = attrs.fields_dict(cls)[field]
    blank = object.__new__(cls)  # the field's own validators, as __init__ runs them
    with pytest.raises(FieldTypeError, match=rf"^{cls.__name__}\.{field}: expected .+, got object <object"):
        attribute.validator(blank, attribute, ALIEN)


def test_a_config_made_in_python_is_refused_where_it_is_made():
    from minfm_plugins.flow.config import LogitNormalTimeConfig, RectifiedConfig

    with pytest.raises(FieldTypeError, match=r"^RectifiedConfig.compute_dtype: expected 'fp32' \| 'bf16' \| 'fp16', "
                                             r"got a string 'fp64'$"):
        RectifiedConfig(compute_dtype="fp64")
    with pytest.raises(FieldTypeError, match=r"^LogitNormalTimeConfig.mu: expected float, got a string '1'$"):
        LogitNormalTimeConfig(mu="1")  # its range check never sees a string
    with pytest.raises(FieldTypeError, match=r"^LogitNormalTimeConfig.sigma: expected float, got bool True$"):
        LogitNormalTimeConfig(sigma=True)
    assert LogitNormalTimeConfig(mu=1, sigma=0.5).mu == 1  # an int is a float, as in a recipe
    assert attrs.evolve(RectifiedConfig(), compute_dtype="bf16").compute_dtype == "bf16"


def test_a_recipe_still_gets_its_own_path_named_messages():
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, ['flow.time_sampler={name = "logit_normal", mu = "1"}', 'flow.path.compute_dtype="fp64"'])
    text = str(info.value)
    assert "flow.time_sampler.mu: expected float" in text and "flow.path.compute_dtype: expected one of" in text
    assert "LogitNormalTimeConfig" not in text and "RectifiedConfig" not in text  # the recipe's words


def test_a_list_is_a_tuple_where_a_config_made_in_python_takes_one():
    from minfm_core.config import config, field

    @config
    class Scales:
        scales: tuple[float, ...] = field(factory=list, doc="a factory's list")
        sizes: tuple[tuple[int, int], ...] = field(((16, 16),), doc="pairs")

    assert Scales().scales == () and Scales(sizes=[[8, 8], [16, 24]]).sizes == ((8, 8), (16, 24))
    with pytest.raises(FieldTypeError, match=r"^Scales.sizes: expected tuple\[tuple\[int, int\], \.\.\.\], got"):
        Scales(sizes=[[8, "8"]])
