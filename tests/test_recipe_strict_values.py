"""Strict recipe values and loading: arrays are arrays, ``--set`` merges tables like
``extends``, environment errors name the recipe file, a UTF-8 BOM is ignored, and numbers on
the command line are ASCII. Cases come from the schema, the registry and the parser tree, so a
new field, component or flag is covered as soon as it exists."""

from __future__ import annotations

import argparse
import collections
import collections.abc as abc
import math
import types
import typing

import attrs
import pytest

from minfm_core.config import converter, structure, unstructure
from minfm_core.errors import MinfmError, RecipeError
from minfm_core.recipe import load_recipe_dict
from minfm_core.recipe.load import shipped_recipes
from minfm_core.recipe.schema import Recipe, Spec

QUICKSTART = shipped_recipes() / "quickstart.toml"

# ---- 1. an array field takes an array, never a string or a table split up -------------------

_ARRAYS = (tuple, list, set, frozenset, collections.deque, abc.Sequence, abc.MutableSequence, abc.Set, abc.MutableSet)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _is_array(tp) -> bool:
    return (typing.get_origin(tp) or tp) in _ARRAYS


def _array_fields(cls, keys=(), seen=()):
    """(keys, type) of every array-typed field under ``cls``, nested configs included."""
    if cls in seen:
        return
    hints = typing.get_type_hints(cls)
    for a in attrs.fields(cls):
        tp = _strip_optional(hints.get(a.name, a.type))
        if _is_array(tp):
            yield (*keys, a.name), tp
        elif attrs.has(tp) and isinstance(tp, type) and tp is not Spec:
            yield from _array_fields(tp, (*keys, a.name), (*seen, cls))


def _nested(keys, value):
    for k in reversed(keys):
        value = {k: value}
    return value


def _cases():
    from minfm_core.registry import get_registry

    roots = [("recipe", "", Recipe)]
    for comp in get_registry().all_components():
        if comp.config is not None and attrs.has(comp.config):
            roots.append((f"{comp.kind}:{comp.name}", f"{comp.kind}.{comp.name}", comp.config))
    return [(rid, path, cls, keys, tp) for rid, path, cls in roots for keys, tp in _array_fields(cls)]


CASES = _cases()


def test_the_walk_found_the_array_fields():
    where = {f"{path}.{'.'.join(keys)}".lstrip(".") for _, path, _, keys, _ in CASES}
    assert {"sample.prompts", "sample.size", "train.adam_betas", "logging.loggers", "dataset.shapes.sizes"} <= where
    assert NESTED  # arrays of arrays (a dataset's sizes) are walked too


def _problems(data, cls, path):
    try:
        structure(data, cls, path=path)
    except RecipeError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize("bad", ["ab", "a red circle", {"console": 1, "jsonl": 2}, b"ab"], ids=["str2", "str", "table", "bytes"])
@pytest.mark.parametrize(("rid", "path", "cls", "keys", "tp"), CASES,
                         ids=[f"{c[0]}.{'.'.join(c[3])}" for c in CASES])
def test_an_array_field_refuses_a_string_or_a_table(rid, path, cls, keys, tp, bad):
    where = ".".join(filter(None, [path, *keys]))
    lines = _problems(_nested(keys, bad), cls, path)
    hits = [ln for ln in lines if ln.startswith(f"{where}: expected an array, got ")]
    assert len(hits) == 1 and "\n" not in hits[0], lines


def _elements_are_arrays(tp) -> bool:
    args = typing.get_args(tp)
    return bool(args) and _is_array(_strip_optional(args[0]))


NESTED = [c for c in CASES if _elements_are_arrays(c[4])]


@pytest.mark.parametrize(("rid", "path", "cls", "keys", "tp"), NESTED,
                         ids=[f"{c[0]}.{'.'.join(c[3])}" for c in NESTED])
def test_an_array_of_arrays_refuses_a_string_element(rid, path, cls, keys, tp):
    args = typing.get_args(tp)
    n = len(args) if (typing.get_origin(tp) is tuple and args[-1] is not Ellipsis) else 1
    where = ".".join(filter(None, [path, *keys]))
    lines = _problems(_nested(keys, ["ab"] * n), cls, path)
    assert f"{where}[0]: expected an array, got a string 'ab'" in lines, lines


@pytest.mark.parametrize(("rid", "path", "cls", "keys", "tp"), CASES,
                         ids=[f"{c[0]}.{'.'.join(c[3])}" for c in CASES])
def test_an_array_field_takes_its_default_as_an_array(rid, path, cls, keys, tp):
    """The strict hook keeps what worked: a list (and a tuple) structure as before."""
    owner = cls
    for k in keys[:-1]:
        owner = _strip_optional(typing.get_type_hints(owner)[k])
    a = attrs.fields_dict(owner)[keys[-1]]
    if a.default is attrs.NOTHING:
        pytest.skip("no default")
    default = a.default.factory() if isinstance(a.default, attrs.Factory) else a.default  # type: ignore[arg-type]
    if default is None:
        pytest.skip("default None")
    as_toml = unstructure(default)
    assert converter.structure(list(as_toml), tp) == default
    assert converter.structure(tuple(as_toml), tp) == default


@pytest.mark.parametrize(("override", "where"), [
    ('sample.prompts="a red circle"', "sample.prompts"),
    ("logging.loggers={console=1,jsonl=2}", "logging.loggers"),
    ('data.scales="large"', "data.scales"),
    ('model.patchifier.patch_size="122"', "model.patchifier.patch_size"),
])
def test_check_refuses_a_string_or_table_for_an_array_in_one_line(override, where, capsys):
    from minfm_core.cli.main import main

    assert main(["check", str(QUICKSTART), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minfm: error: {QUICKSTART}: {where}: expected an array, got ") and "\n" not in err, err


def test_tuple_lengths_and_elements_are_still_checked():
    from minfm_core.recipe.schema import SampleSection

    with pytest.raises(RecipeError, match=r"^sample\.size: expected an array of 3 values"):
        structure({"size": [1, 2]}, SampleSection, path="sample")
    with pytest.raises(RecipeError, match=r"^sample\.size\[1\]: expected int, got 'x'$"):
        structure({"size": [1, "x", 3]}, SampleSection, path="sample")


# ---- 2. --set KEY={...} merges into the table, by extends' rule --------------------------------

def _tables(data, keys=()):
    """Every table path of ``data`` with one of its own scalar (or array) keys."""
    for k, v in data.items():
        if isinstance(v, dict):
            leaf = next(((kk, vv) for kk, vv in v.items() if not isinstance(vv, dict)), None)
            if leaf is not None:
                yield (*keys, k), leaf
            yield from _tables(v, (*keys, k))


def _toml_value(value) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value})[4:].strip()


BASE = load_recipe_dict(QUICKSTART)
TABLES = list(_tables(BASE))


def test_the_walk_found_the_tables():
    paths = {".".join(p) for p, _ in TABLES}
    assert {"train", "run", "model.denoiser", "flow.time_sampler", "sample", "sample.guidance"} <= paths


@pytest.mark.parametrize(("keys", "leaf"), TABLES, ids=[".".join(p) for p, _ in TABLES])
def test_set_of_a_table_merges_like_extends(keys, leaf, tmp_path):
    """``--set T={k=v}`` keeps T's other keys, and gives exactly what a file extending the
    recipe with ``[T] k = v`` gives."""
    k, v = leaf
    new = (v + 1) if isinstance(v, int) and not isinstance(v, bool) else v
    override = f"{'.'.join(keys)}={{{k} = {_toml_value(new)}}}"
    by_set = load_recipe_dict(QUICKSTART, [override])
    expected = BASE
    for part in keys:
        expected = expected[part]
    got = by_set
    for part in keys:
        got = got[part]
    assert got == {**expected, k: new}
    child = tmp_path / "child.toml"
    child.write_text(f'extends = {_toml_value(str(QUICKSTART))}\n[{".".join(keys)}]\n{k} = {_toml_value(new)}\n')
    assert load_recipe_dict(child) == by_set


def test_set_train_table_keeps_the_recipes_other_train_values():
    data = load_recipe_dict(QUICKSTART, ["train={max_steps=3}"])
    assert data["train"] == {**BASE["train"], "max_steps": 3}
    assert data["train"]["lr"] == 1.5e-3 and data["train"]["ckpt_every"] == 250


def test_set_of_a_component_table_that_changes_name_starts_afresh(tmp_path):
    """The same rule as extends (and as --set T.name=other): the old component's options go."""
    data = load_recipe_dict(QUICKSTART, ['flow.time_sampler={name = "uniform"}'])
    assert data["flow"]["time_sampler"] == {"name": "uniform"}
    child = tmp_path / "child.toml"
    child.write_text(f'extends = {_toml_value(str(QUICKSTART))}\n[flow.time_sampler]\nname = "uniform"\n')
    assert load_recipe_dict(child) == data
    same = load_recipe_dict(QUICKSTART, ['flow.time_sampler={name = "logit_normal", sigma = 2.0}'])
    assert same["flow"]["time_sampler"] == {"name": "logit_normal", "mu": 0.0, "sigma": 2.0}


def test_set_of_a_table_appends_with_a_plus_key_and_replaces_arrays():
    data = load_recipe_dict(QUICKSTART, ['logging={"loggers+" = [{name = "tensorboard"}]}'])
    assert [x["name"] for x in data["logging"]["loggers"]] == ["console", "jsonl", "tensorboard"]
    data = load_recipe_dict(QUICKSTART, ['logging={loggers = [{name = "tensorboard"}]}'])
    assert data["logging"]["loggers"] == [{"name": "tensorboard"}]
    data = load_recipe_dict(QUICKSTART, ["data={sizes = [[16, 16]]}"])
    assert data["data"] == {**BASE["data"], "sizes": [[16, 16]]}


def test_set_of_a_table_where_there_is_none_sets_it(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[run]\nexp_dir = "x"\n')
    assert load_recipe_dict(p, ["train={max_steps = 3}", "run=5"]) == {"train": {"max_steps": 3}, "run": 5}


def test_on_a_recipe_from_outside_a_set_table_still_replaces(tmp_path):
    """The user's --set is trusted by its key (``run`` and all under it): merged, a downloaded
    recipe's own ``run.exp_dir`` would have passed as the user's choice."""
    from minfm_core.recipe import load_recipe

    repo = tmp_path / "repo"
    repo.mkdir()
    p = repo / "recipe.toml"
    p.write_text('extends = "minfm:quickstart.toml"\n[run]\nexp_dir = "/somewhere/else"\nseed = 7\n')
    assert load_recipe_dict(p, ["run={seed = 1}"], untrusted_root=repo)["run"] == {"seed": 1}
    resolved = load_recipe(p, ["run={seed = 1}"], untrusted_root=repo)
    assert resolved.recipe.run.exp_dir != "/somewhere/else" and resolved.recipe.run.seed == 1
    # the user's own recipe merges
    assert load_recipe_dict(p, ["run={seed = 1}"])["run"] == {"exp_dir": "/somewhere/else", "seed": 1}


# ---- 3. an environment error names the recipe file --------------------------------------------

@pytest.mark.parametrize(("value", "message"), [
    ("${MINFM_STRICT_UNSET}/x", "run.exp_dir: environment variable MINFM_STRICT_UNSET is not set"),
    ("${MINFM_STRICT_UNSET", "run.exp_dir: malformed environment reference"),
])
def test_an_environment_error_names_the_recipe_file(value, message, tmp_path, monkeypatch, capsys):
    from minfm_core.cli.main import main

    monkeypatch.delenv("MINFM_STRICT_UNSET", raising=False)
    p = tmp_path / "r.toml"
    p.write_text(f'extends = {_toml_value(str(QUICKSTART))}\n[run]\nexp_dir = "{value}"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe_dict(p)
    assert str(info.value).startswith(f"{p}: {message}"), str(info.value)
    assert main(["check", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minfm: error: {p}: {message}") and "\n" not in err, err


# ---- 4. a UTF-8 byte-order mark is ignored ---------------------------------------------------

def test_a_byte_order_mark_is_ignored(tmp_path):
    text = QUICKSTART.read_text(encoding="utf-8")
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert load_recipe_dict(p) == BASE
    parent = tmp_path / "parent.toml"
    parent.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    child = tmp_path / "child.toml"
    child.write_bytes(b'\xef\xbb\xbfextends = "parent.toml"\n[train]\nmax_steps = 3\n')
    assert load_recipe_dict(child) == {**BASE, "train": {**BASE["train"], "max_steps": 3}}


def test_a_byte_order_mark_is_ignored_by_check(tmp_path, capsys):
    from minfm_core.cli.main import main

    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf" + QUICKSTART.read_bytes())
    assert main(["check", str(p)]) == 0, capsys.readouterr().err


def test_a_byte_order_mark_elsewhere_is_still_invalid_toml(tmp_path):
    p = tmp_path / "mid.toml"
    p.write_bytes(b'job = "train"\n\xef\xbb\xbf[run]\n')
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe_dict(p)
    p.write_bytes(b"\xef\xbb\xbf\xef\xbb\xbf[run]\n")  # one mark is stripped, not any number
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe_dict(p)


# ---- 5. numbers on the command line are ASCII ------------------------------------------------

def _ranged_flags():
    from minfm_core.cli.main import build_parser

    def walk(parser, path=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, (*path, name))
            elif action.option_strings and hasattr(action.type, "lo"):
                yield path, action

    return list(walk(build_parser()))


RANGED = _ranged_flags()
WIDE = str.maketrans("0123456789.-+", "０１２３４５６７８９．－＋")
ARABIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")


def _in_range(parse, value) -> bool:
    return (parse.lo is None or value >= parse.lo) and (parse.hi is None or value <= parse.hi)


def _lenient_forms(parse) -> list[tuple[str, str]]:
    """(ASCII text, a non-ASCII or underscored spelling Python's int()/float() reads as the same
    in-range value): the bug's inputs, each a value the flag would otherwise take."""
    is_int = isinstance(parse.lo, int) and not isinstance(parse.lo, bool)
    pick = [v for v in (parse.lo, parse.hi, 10, 12, 0.25, 1.5, 2) if v is not None and not
            (isinstance(v, float) and math.isinf(v)) and (not is_int or isinstance(v, int)) and _in_range(parse, v)]
    out = []
    for v in pick:
        text = str(v)
        out += [(text, text.translate(WIDE)), (text, text.translate(ARABIC)), (text, f" {text}"), (text, f"{text}\n")]
        digits = [i for i in range(1, len(text)) if text[i - 1].isdigit() and text[i].isdigit()]
        if digits:
            out.append((text, text[: digits[0]] + "_" + text[digits[0]:]))
    # only spellings Python's own parser reads as that value: what the flag parser used to take
    return [(a, b) for a, b in out if a != b and _python_reads(b, is_int) == _python_reads(a, is_int)]


def _python_reads(text, is_int):
    try:
        return int(text, 10) if is_int else float(text)
    except ValueError:
        return None


@pytest.mark.parametrize(("path", "action"), RANGED, ids=[f"{' '.join(p)} {a.option_strings[0]}" for p, a in RANGED])
def test_a_number_flag_takes_ascii_only(path, action):
    parse = action.type
    forms = _lenient_forms(parse)
    assert forms, f"no in-range value to try for {action.option_strings[0]}"
    for ascii_text, odd in forms:
        assert parse(ascii_text) == _python_reads(ascii_text, isinstance(parse.lo, int))
        with pytest.raises(MinfmError, match=rf"^{parse.flag}: expected (an integer|a number), got "):
            parse(odd)


def test_world_size_full_width_and_underscore_are_refused(capsys):
    from minfm_core.cli.main import main

    for text in ("３", "1_0", "٣"):
        assert main(["check", str(QUICKSTART), "--world-size", text]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"minfm: error: --world-size: expected an integer, got {text!r}", err
    assert main(["check", str(QUICKSTART), "--world-size", "1"]) == 0


def test_signs_stay_where_the_range_allows_them():
    from minfm_core.cli.argtypes import finite_float, int_in

    assert int_in("--n", -5, 5)("-3") == -3 and int_in("--n", -5, 5)("+3") == 3
    with pytest.raises(MinfmError, match="expected a positive integer, got -3"):
        int_in("--n", 1, 5)("-3")
    assert finite_float("--x", -1.0, 1.0)("-0.5") == -0.5 and finite_float("--x", 0.0, 10.0)("1e-3") == 1e-3
    for bad in ("1__0", "--1", "0x10", "1.5", ""):
        with pytest.raises(MinfmError, match="expected an integer"):
            int_in("--n", -100, 100)(bad)
    with pytest.raises(MinfmError, match="expected a finite number"):
        finite_float("--x", 0.0, 1.0)("nan")
