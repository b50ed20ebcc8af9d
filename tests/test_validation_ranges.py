"""Every numeric field of run/train/sample and of every registered component config declares
its valid range, and `minfm check` refuses a value outside it: exit 2, one line naming the
field's recipe path, no traceback.

The cases are generated from the schema and the registry (each field's declared range
yields its out-of-range values), so a new field or component is covered without editing
this file; a numeric field without a range fails `test_every_numeric_field_has_a_range`.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path

import attrs
import pytest

from minfm_core.cli.main import main
from minfm_core.recipe.schema import SLOTS, RunSection, SampleSection, TrainSection
from minfm_core.registry import get_registry
from minfm_core.validators import Range, range_of

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "quickstart.toml")
SECTIONS = {"run": RunSection, "train": TrainSection, "sample": SampleSection}

#: Numeric fields deliberately without a range, with the reason. (Empty: keep it that way
#: unless a field truly takes any number, and then say why here.)
UNBOUNDED: dict[str, str] = {}


def _numeric(tp) -> bool:
    """int / float, optionally inside Optional[...] or (nested) tuples."""
    if tp in (int, float):
        return True
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if origin in (typing.Union, tuple) or str(origin) == "<class 'types.UnionType'>":
        return bool(args) and all(_numeric(a) for a in args)
    return False


def _is_int(tp) -> bool:
    if tp is int:
        return True
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    return bool(args) and all(_is_int(a) for a in args)


def _slot_for(kind: str) -> str:
    if kind == "logger":
        return "logging.loggers"
    return next(path for path, k in SLOTS.items() if k == kind)


def numeric_fields():
    """(recipe path prefix, owner label, config class, component name or None) for every config."""
    owners = [(name, f"[{name}]", cls, None) for name, cls in SECTIONS.items()]
    reg = get_registry()
    from minfm_core.registry import KINDS

    for kind in KINDS:
        if kind == "source":
            continue
        for comp in reg.components(kind):
            if comp.config is not None:
                owners.append((_slot_for(kind), f"{kind} {comp.name}", comp.config, comp.name))
    for prefix, label, cls, comp in owners:
        hints = typing.get_type_hints(cls)
        for a in attrs.fields(cls):
            if _numeric(hints[a.name]):
                yield prefix, label, cls, comp, a, hints[a.name]


FIELDS = list(numeric_fields())


def _toml(v) -> str:
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        return '"' + v + '"'
    return repr(v)


def _bad_value(a: attrs.Attribute, bad):
    """The field's value with one number replaced by ``bad`` (first element of a tuple)."""
    default = a.default if not isinstance(a.default, attrs.Factory) else a.default.factory()  # type: ignore[arg-type]
    if isinstance(default, tuple) and default:
        first = default[0]
        if isinstance(first, tuple):
            return ((bad, *first[1:]), *default[1:])
        return (bad, *default[1:])
    if isinstance(default, tuple) or (default is None and "tuple" in str(a.type)):
        return (bad, 1, 1)
    return bad


def cases():
    for prefix, label, cls, comp, a, tp in FIELDS:
        rng = range_of(a.validator)
        if rng is None:
            continue  # test_every_numeric_field_has_a_range reports it
        for bad in rng.violations(integer=_is_int(tp)):
            yield pytest.param(prefix, cls, comp, a, bad, id=f"{label}.{a.name}={bad!r}")


def _override(prefix: str, cls, comp: str | None, a, bad) -> tuple[str, str]:
    """(--set text, the recipe path the error must name)."""
    value = _toml(_bad_value(a, bad))
    if comp is None:
        return f"{prefix}.{a.name}={value}", f"{prefix}.{a.name}"
    table = {"name": f'"{comp}"'}
    for other in attrs.fields(cls):  # required fields get a plain value so only ours is wrong
        if other.default is attrs.NOTHING and other.name != a.name:
            table[other.name] = '"x"'
    table[a.name] = value
    inline = "{" + ", ".join(f"{k} = {v}" for k, v in table.items()) + "}"
    if prefix == "logging.loggers":
        return f"logging.loggers=[{inline}]", f"logging.loggers[0].{a.name}"
    return f"{prefix}={inline}", f"{prefix}.{a.name}"


def test_every_numeric_field_has_a_range():
    missing = [f"{label}.{a.name}" for _, label, _, _, a, _ in FIELDS
               if range_of(a.validator) is None and f"{label}.{a.name}" not in UNBOUNDED]
    assert not missing, f"numeric fields without a declared range (minfm_core.validators): {missing}"


def test_every_range_has_an_upper_bound():
    """'> 0' let `d_model = 2**40` or `sample.steps = 10**12` through to an allocator error or a
    gallery that never ends; every range names its largest sensible value (or inf, documented)."""
    open_ended = [f"{label}.{a.name} ({range_of(a.validator)!r})" for _, label, _, _, a, _ in FIELDS
                  if f"{label}.{a.name}" not in UNBOUNDED and range_of(a.validator) is not None
                  and (range_of(a.validator).hi is None or range_of(a.validator).lo is None)]
    assert not open_ended, f"numeric fields with a half-open range: {open_ended}"


def test_the_sweep_covers_sections_and_components():
    labels = {label for _, label, *_ in FIELDS}
    assert {"[run]", "[train]", "[sample]"} <= labels
    assert len(labels) > 20  # every kind's built-ins, not just a few


@pytest.mark.parametrize(("prefix", "cls", "comp", "attribute", "bad"), list(cases()))
def test_out_of_range_value_is_refused_by_check(prefix, cls, comp, attribute, bad, capsys):
    setting, path = _override(prefix, cls, comp, attribute, bad)
    rc = main(["check", RECIPE, "--set", setting])
    err = capsys.readouterr().err
    assert rc == 2, (setting, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{path}: " in lines[0], (setting, err)


def test_range_error_reads_well(capsys):
    assert main(["check", RECIPE, "--set", "train.lr=nan"]) == 2
    assert capsys.readouterr().err.strip() == (f"minfm: error: {RECIPE}: train.lr: must be finite and in [0, 1], "
                                               "got nan (from --set train.lr)")
    assert main(["check", RECIPE, "--set", "train.adam_betas=[2.0, 0.5]"]) == 2
    assert "train.adam_betas: each element must be in [0, 1), got 2.0" in capsys.readouterr().err


def test_a_problem_from_a_set_names_it(tmp_path, capsys):
    """The line named only the recipe file, which may not even hold the key (`tiny.toml: <root>:
    unknown key 'nosuch'`); a problem of the file's own is not blamed on an unrelated --set."""
    assert main(["check", RECIPE, "--set", "nosuch.key=1"]) == 2
    assert capsys.readouterr().err.strip().endswith("<root>: unknown key 'nosuch' (from --set nosuch.key)")
    assert main(["check", RECIPE, "--set", "train.nosuch=1"]) == 2
    assert capsys.readouterr().err.strip().endswith("train: unknown key 'nosuch' (from --set train.nosuch)")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'extends = "{RECIPE}"\n[train]\nlr = 5.0\n')
    assert main(["check", str(bad), "--set", "train.max_steps=10", "--set", "run.seed=1"]) == 2
    assert capsys.readouterr().err.strip().endswith("bad.toml: train.lr: must be in [0, 1], got 5.0")


@pytest.mark.parametrize("settings, line", [
    (["model.denoiser.rope_axes=[2,3,3]", "model.denoiser.compile=false"],
     "model.denoiser.rope_axes: (2, 3, 3) must be 3 positive even numbers (t, y, x) (from --set model.denoiser.rope_axes)"),
    (["model.denoiser.d_head=48", "model.denoiser.compile=false"],
     "model.denoiser.d_head: d_model 128 is not a multiple of d_head 48 (from --set model.denoiser.d_head)"),
    # a typo in a middle part of the key: the unknown key is the one the --set reached into
    (["model.denoisr.d_model=64"], "model: unknown key 'denoisr' (did you mean 'denoiser'?) "
                                   "(from --set model.denoisr.d_model)"),
    (["trian.lr=0.1"], "<root>: unknown key 'trian' (did you mean 'train'?) (from --set trian.lr)"),
    # filed under another field of the same table, which names the one set
    (["model.denoiser.d_head=16"], "model.denoiser.rope_axes: sum 32 must equal d_head = 16 "
                                   "(from --set model.denoiser.d_head)"),
    (["flow.time_warper.base_len=1024"], "flow.time_warper.max_len: must differ from base_len (1024) "
                                         "(from --set flow.time_warper.base_len)"),
    # found while the value is read (expanded), before the schema sees it
    (['sample.prompts=["${MINFM_SURELY_UNSET}"]'], "sample.prompts[0]: environment variable MINFM_SURELY_UNSET is not "
                                                   "set (or write ${MINFM_SURELY_UNSET:-default}) (from --set sample.prompts)"),
])
def test_a_config_check_blames_the_set_it_names(settings, line, capsys):
    """A config's own check (__attrs_post_init__) was filed under its table, so the last --set
    into that table was blamed: rope_axes [2,3,3] read '(from --set model.denoiser.compile)'."""
    args = ["check", RECIPE]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(line)


def test_a_table_problem_blames_only_a_set_it_names():
    from minfm_core.recipe.resolve import _blame

    set_by = [("model.denoiser.flavor", "--set model.denoiser.flavor"), ("model.denoiser.compile", "--set model.denoiser.compile")]
    problem = "model.denoiser: no flavor given, so these must be set: d_model"
    assert _blame(problem, set_by) == problem + " (from --set model.denoiser.flavor)"
    assert _blame(problem, set_by[1:]) == problem


@pytest.mark.parametrize("setting, line", [
    ("train.total_batch_size=30", "train.total_batch_size: 30 is not a positive multiple of train.batch_size x world "
                                  "size = 16 x 1 = 16 (from --set train.total_batch_size)"),
    # the problem is about another setting, and names the one the user set
    ("train.batch_size=3", "train.total_batch_size: 32 is not a positive multiple of train.batch_size x world "
                           "size = 3 x 1 = 3 (from --set train.batch_size)"),
    ("train.min_lr=0.01", "train.min_lr: 0.01 is above the peak train.lr = 0.0015 (from --set train.min_lr)"),
    ("train.profile_steps=[0]", "(from --set train.profile_steps)"),
    ("train.grad_spike_threshold=0.5", "train.grad_spike_threshold: 0.5 is not above 1, and with train.grad_spike_rule "
                                       "= 'running_mean' it is a multiple of the mean grad norm (from --set "
                                       "train.grad_spike_threshold)"),
])
def test_a_start_up_problem_from_a_set_names_it(setting, line, capsys):
    """The job's start-up checks (two settings together) ran after the recipe loaded, and their
    problems lost the '(from --set ...)' every single-field problem has."""
    assert main(["check", RECIPE, "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minfm: error: {RECIPE}: ") and err.endswith(line), err


def test_a_problem_from_a_sample_flag_names_the_flag(tmp_path):
    """`minfm sample --size 33x32` blamed '--set sample.size', which the user never typed."""
    from minfm_core.errors import RecipeError
    from minfm_core.recipe import load_recipe

    flags = {"job": "", "sample.size": "--size"}
    with pytest.raises(RecipeError, match=r"sample.size: height and width 33x32 must be multiples .*\(from --size\)$"):
        load_recipe(RECIPE, ["job=sample", "sample.size=[1, 33, 32]"], flags=flags)
    resolved = load_recipe(RECIPE, ["job=sample", "sample.steps=3"], flags={**flags, "sample.steps": "--steps"})
    assert resolved.blame("sample.steps: too few for this sampler") == "sample.steps: too few for this sampler (from --steps)"
    assert resolved.blame("a sample job needs prompts") == "a sample job needs prompts"  # job=sample blames nothing


@pytest.mark.parametrize("setting", ["train.total_batch_size=-1", "parallel={name = \"fsdp2\", shard_size = -1}",
                                     "train.ema_decay=0.0", "train.ckpt_every=0", "train.grad_clip_norm=inf",
                                     "train.grad_spike_threshold=inf"])
def test_documented_sentinels_are_accepted(setting, capsys):
    """'-1: all ranks', '0 disables', 'inf: no clipping' are in the field docs, so they pass."""
    assert main(["check", RECIPE, "--set", setting]) == 0, capsys.readouterr().err


def test_ranges_are_listed_by_minfm_plugins(capsys):
    import json

    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    train = {f["name"]: f for f in info["sections"]["train"]}
    assert train["lr"]["range"] == "in [0, 1]" and train["ema_decay"]["range"] == "in [0, 1)"
    (flux,) = [c for c in info["kinds"]["denoiser"] if c["name"] == "flux"]
    assert {f["name"]: f["range"] for f in flux["fields"]}["n_ds_blocks"] == "in [0, 1024]"
    assert main(["plugins"]) == 0
    assert "text_dropout: float = 0.1  # probability of dropping a prompt" in capsys.readouterr().out


def test_range_violations_are_outside_the_range():
    for rng in (Range(0, lo_open=True), Range(0, 1, hi_open=True), Range(1, also=(-1,)), Range()):
        for integer in (True, False):
            for v in rng.violations(integer):
                assert not rng.ok(v)


def _arch_cases():
    from minfm_plugins.text_encoders.configs import MAX_ARCH_INT
    from minfm_plugins.text_encoders.presets import CLIP_PRESETS, T5_PRESETS

    for encoder, presets in (("t5", T5_PRESETS), ("clip", CLIP_PRESETS)):
        example = {k: v for preset in presets.values() for k, v in preset.items()}
        for key, like in sorted(example.items()):
            if isinstance(like, bool):
                bad = ["1", '"yes"']
            elif isinstance(like, str):
                bad = ["1", '"' + "x" * 65 + '"']
            elif isinstance(like, float):
                bad = ["-0.5", "2.0", "nan", "true"]
            else:
                bad = ["-1", str(MAX_ARCH_INT + 1), "1.5", '"8"']
            for value in bad:
                yield pytest.param(encoder, key, value, id=f"{encoder}.arch.{key}={value}")


@pytest.mark.parametrize(("encoder", "key", "value"), list(_arch_cases()))
def test_encoder_arch_overrides_are_typed_and_bounded(encoder, key, value, capsys):
    """A T5 / CLIP `arch` table is free-form, so each value is held to its preset's type and a range:
    `arch = {d_model = 2**40}` used to reach transformers' allocator."""
    slot = "model.text_encoder"
    assert main(["check", RECIPE, "--set", f'{slot}={{name = "{encoder}", arch = {{{key} = {value}}}}}']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{slot}.arch.{key}: expected " in err, err


@pytest.mark.parametrize("setting, line", [
    ("model.denoiser.pretrained=bogus://x", "model.denoiser.pretrained: bogus://x: no plugin resolves the source "
                                            "scheme 'bogus' (installed: hf) (from --set model.denoiser.pretrained)"),
    ("model.denoiser.pretrained=hf://a", "model.denoiser.pretrained: hf://a: not a Hub reference of the form "
                                         "hf://org/name[@revision][/path] (from --set model.denoiser.pretrained)"),
    ("model.denoiser.pretrained=/nonexistent/zz", "model.denoiser.pretrained: /nonexistent/zz: no such file or "
                                                  "directory (and not a Hub id of the form org/name) "
                                                  "(from --set model.denoiser.pretrained)"),
    ("model.denoiser.pretrained='   '", "model.denoiser.pretrained: '   ' is blank; leave it unset (or name a path "
                                        "or a Hub reference) (from --set model.denoiser.pretrained)"),
    ("train.init_from=bogus://x", "train.init_from: bogus://x: no plugin resolves the source scheme 'bogus' "
                                  "(installed: hf) (from --set train.init_from)"),
    ("train.init_from=hf://a", "train.init_from: hf://a: not a Hub reference of the form hf://org/name[@revision] "
                               "(from --set train.init_from)"),
])
def test_check_refuses_references_the_run_refuses_without_a_request(setting, line, capsys):
    """`minfm check` said ok to these; `minfm run` then refused each at start-up."""
    assert main(["check", RECIPE, "--set", setting]) == 2
    assert capsys.readouterr().err.strip().endswith(line)


def test_a_distilled_guidance_the_denoiser_would_ignore_is_refused(capsys):
    """The quickstart FLUX embeds no guidance scale: sample.distilled_guidance = 5 drew images
    as if it were unset, without a word."""
    assert main(["check", RECIPE, "--set", "sample.distilled_guidance=5"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "sample.distilled_guidance: the denoiser embeds no guidance scale (model.denoiser.guidance_embed = false), "
        "so the value would be ignored; leave it unset (from --set sample.distilled_guidance)")
    assert main(["check", RECIPE, "--set", "sample.distilled_guidance=5", "--set", "model.denoiser.guidance_embed=true"]) == 0


@pytest.mark.parametrize("settings, drawn", [
    (['sample.prompts=["a", "b"]', "sample.samples_per_prompt=513"], None),
    (['sample.prompts=["a", "b"]', "sample.samples_per_prompt=513", "train.sample_every=0",
      "train.sample_at_start=true"], None),
    (['sample.prompts=["a", "b"]', "sample.samples_per_prompt=512"], "ok"),
    (['sample.prompts=["a", "b"]', "sample.samples_per_prompt=513", "train.sample_every=0"], "ok"),  # no galleries
])
def test_a_training_gallery_is_bounded(settings, drawn, capsys):
    """A gallery of 1.1 M prompts passed the check and drew for hours inside the training loop
    (SIGTERM waits for the step to end); a gallery is at most MAX_GALLERY images."""
    args = ["check", RECIPE]
    for s in settings:
        args += ["--set", s]
    code = main(args)
    err = capsys.readouterr().err.strip()
    if drawn == "ok":
        assert code == 0, err
    else:
        assert code == 2 and "2 prompt(s) x 513 samples = 1,026 images a training gallery, more than 1,024" in err, err


def _file_fields():
    from minfm_core.registry import KINDS

    owners = [(f"[{name}]", cls) for name, cls in SECTIONS.items()]
    owners += [(f"{kind} {comp.name}", comp.config) for kind in KINDS if kind != "source"
               for comp in get_registry().components(kind) if comp.config is not None]
    return [(where, a) for where, cls in owners for a in attrs.fields(cls) if a.metadata.get("file")]


def test_every_file_field_takes_only_names_a_file_system_takes():
    """`exists()` of a 300-byte file name raised "File name too long", quoting the value whole
    (100 KB) and naming no setting; every field naming a file is checked when the recipe loads."""
    from minfm_core.validators import path_name

    fields = _file_fields()
    assert len(fields) >= 10
    unchecked = [f"{where}.{a.name}" for where, a in fields
                 if path_name not in getattr(a.validator, "_validators", (a.validator,))]
    assert not unchecked, unchecked


@pytest.mark.parametrize("key", ["sample.prompt_file", "run.exp_dir", "model.denoiser.pretrained", "sample.out_dir",
                                 "train.init_from"])
def test_a_file_name_too_long_is_one_line_naming_the_setting(key, capsys):
    value = "/tmp/" + "x" * 300
    assert main(["check", RECIPE, "--set", f'{key}="{value}"']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minfm: error: {RECIPE}: {key}: a path of 305 bytes with a part of 300: ") and len(err) < 400, err


@pytest.mark.parametrize("value, why", [
    ('"bad"', "'bad': expected MODULE:ATTR"),
    ('"a\\nb"', "'a\\nb': expected MODULE:ATTR"),
    ('"os:system"', "'os:system': os is a standard-library module, not a feature-extractor factory"),
])
def test_the_fid_extractor_is_checked_by_the_check_as_by_the_run(value, why, capsys):
    """`minfm check` said ok to these; the run refused them at start, naming `train.fid`."""
    assert main(["check", RECIPE, "--set", "train.fid_every=1", "--set", 'train.fid_ref="/tmp"',
                 "--set", f"train.fid_extractor={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"minfm: error: {RECIPE}: train.fid_extractor: {why} (from --set train.fid_extractor)", err


def test_a_missing_local_inception_file_is_a_warning_of_the_check(capsys):
    assert main(["check", RECIPE, "--set", "train.fid_every=1", "--set", 'train.fid_ref="/tmp"',
                 "--set", 'train.fid_inception="/nonexistent/pt_inception.pth"']) == 0
    assert "minfm: warning: train.fid_inception: /nonexistent/pt_inception.pth does not exist (yet)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("words, line", [
    ("[]", "model.text_encoder.words: an empty vocabulary: every prompt would read as <unk>"),
    ('["red", "x-ray"]', "model.text_encoder.words[1]: 'x-ray' can never match: prompts are lower-cased and split "
                         "into runs of a-z and 0-9"),
    ('["red", "a b"]', "model.text_encoder.words[1]: 'a b' can never match"),
    ('["red", "red"]', "model.text_encoder.words: listed twice: 'red'"),
])
def test_a_vocabulary_word_no_prompt_can_hold_is_refused(words, line, tmp_path, capsys):
    """They trained (exit 0) with words no token ever matched, or with every prompt <unk>."""
    recipe = tmp_path / "vocab.toml"
    recipe.write_text(f'extends = "{ROOT / "tests" / "recipes" / "tiny.toml"}"\n'
                      f'[model.text_encoder]\nname = "vocab"\ndim = 16\nwords = {words}\n')
    assert main(["check", str(recipe)]) == 2
    assert line in capsys.readouterr().err
