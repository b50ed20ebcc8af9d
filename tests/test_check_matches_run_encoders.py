"""Text encoders: `minfm check` refuses what the run would crash on (a pooled encoder in the
per-token slot and the reverse, no text encoder at all, T5 / CLIP `arch` overrides transformers
cannot build or run), with one line naming the recipe field; what it accepts builds and runs."""

from __future__ import annotations

import json

import attrs
import pytest
import torch

from encoder_fixtures import CLIP_ARCH, T5_ARCH
from engine_helpers import TINY
from minfm_core.cli.main import main
from minfm_core.config import structure
from minfm_core.errors import MinfmError, RecipeError
from minfm_core.recipe import load_recipe, load_recipe_dict, resolve_recipe
from minfm_core.registry import get_registry
from minfm_plugins.text_encoders.configs import (
    _EXTRA_ARCH_KEYS, ARCH_INT_RANGES, ClipEncoderConfig, T5EncoderConfig, activation_names,
)
from minfm_plugins.text_encoders.presets import CLIP_PRESETS, T5_PRESETS

#: The fewest options each built-in encoder needs to build offline (a new one must be added here).
MINIMAL = {
    "t5": {"pretrained": "", "tokenizer": "", "variant": "t5-v1_1-small", "arch": T5_ARCH},
    "clip": {"pretrained": "", "tokenizer": "", "arch": CLIP_ARCH},
    "class_embedding": {"embeddings": "nowhere/table.safetensors", "dim": 16},
    "vocab": {"dim": 16},
}
#: Each text slot, whether it must be pooled, and the denoiser width it feeds.
SLOTS = {"model.text_encoder": (False, "d_txt"), "model.clip_encoder": (True, "d_vec")}


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _problems(overrides) -> list[str]:
    try:
        load_recipe(TINY, overrides)
    except RecipeError as exc:
        return exc.problems
    return []


def _pooled_cases():
    for comp in get_registry().components("text_encoder"):
        if comp.plugin != "text_encoders":
            continue
        assert comp.name in MINIMAL, f"add the built-in encoder {comp.name!r} to MINIMAL"
        cfg = structure(dict(MINIMAL[comp.name]), comp.config)
        if not hasattr(cfg, "pooled"):
            continue
        settable = "pooled" in attrs.fields_dict(comp.config)
        for pooled in ((False, True) if settable else (cfg.pooled,)):
            for slot in SLOTS:
                yield pytest.param(comp.name, settable, pooled, slot, id=f"{slot}={comp.name}-pooled={pooled}")


@pytest.mark.parametrize(("name", "settable", "pooled", "slot"), list(_pooled_cases()))
def test_each_text_slot_takes_only_its_kind_of_output(name, settable, pooled, slot):
    """Was: an AttributeError / ValueError in engine/pipeline.py encode_text at the first batch."""
    want, width = SLOTS[slot]
    options = {"name": name, **MINIMAL[name], **({"pooled": pooled} if settable else {})}
    config = get_registry().get("text_encoder", name).config
    dim = structure({k: v for k, v in options.items() if k != "name"}, config).dim
    problems = _problems([f"{slot}={_toml(options)}", f"model.denoiser.{width}={dim}"])
    if pooled == want:
        assert problems == []
    elif settable:
        assert problems == [f"{slot}.pooled: must be {str(want).lower()}: this slot gives the denoiser "
                            + ("one pooled vector per prompt" if want else "per-token text embeddings")
                            + f" (model.denoiser.{width}) (from --set {slot})"]
    else:
        assert len(problems) == 1 and problems[0].startswith(f"{slot}.name: {name!r} returns "), problems


@pytest.mark.parametrize("setting", ["model.clip_encoder.pooled=false", "model.text_encoder.pooled=true"])
def test_a_run_with_a_mismatched_encoder_stops_before_any_work(setting, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert main(["run", str(TINY), "--set", f"run.exp_dir={json.dumps(str(exp))}", "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{setting.split('=')[0]}: must be" in err, err
    assert not exp.exists()


def test_a_denoiser_that_takes_text_needs_a_text_encoder():
    """Was: accepted, then 'model.text_encoder: the denoiser needs a text encoder' at the first batch."""
    raw = load_recipe_dict(TINY)
    del raw["model"]["text_encoder"]
    with pytest.raises(RecipeError) as info:
        resolve_recipe(raw, source="r.toml")
    assert info.value.problems == [
        "model.text_encoder: missing: the denoiser takes per-token text embeddings (model.denoiser.d_txt = 16); "
        'add a [model.text_encoder] table (e.g. name = "vocab")'
    ]


# ---- T5 / CLIP `arch` overrides ---------------------------------------------------------------

ENCODERS = {"t5": (T5EncoderConfig, T5_PRESETS, T5_ARCH), "clip": (ClipEncoderConfig, CLIP_PRESETS, CLIP_ARCH)}


def _config(encoder: str, arch: dict, path: str = "model.text_encoder"):
    cls, _, tiny = ENCODERS[encoder]
    extra = {"variant": "t5-v1_1-small"} if encoder == "t5" else {}
    return structure({"pretrained": None, "dtype": "fp32", **extra, "arch": {**tiny, **arch}}, cls, path=path)


def _unchecked(encoder: str, arch: dict):
    """The config with these overrides, its validators off: what the run would get unchecked."""
    with attrs.validators.disabled():
        return attrs.evolve(_config(encoder, {}), arch={**ENCODERS[encoder][2], **arch})


def _runs(encoder: str, cfg) -> bool:
    """Whether transformers builds this encoder and runs it on 80 tokens with finite output."""
    from minfm_plugins.text_encoders.clip import build_clip
    from minfm_plugins.text_encoders.t5 import build_t5

    try:
        torch.manual_seed(0)
        enc = (build_t5 if encoder == "t5" else build_clip)(cfg, load_weights=False)
        n = 80 if encoder == "t5" else cfg.arch["max_position_embeddings"]
        ids = torch.randint(0, cfg.arch["vocab_size"], (2, n))
        with torch.no_grad():
            out = enc.model(input_ids=ids)
        return bool(torch.isfinite(out.last_hidden_state).all())
    except Exception:  # noqa: BLE001 - any failure is what the check must have refused
        return False


def _int_keys(presets):
    example = {k: v for p in presets.values() for k, v in p.items()}
    return sorted(k for k, v in example.items() if type(v) is int) + sorted(_EXTRA_ARCH_KEYS)


@pytest.mark.parametrize(("encoder", "key"), [(e, k) for e, (_, p, _) in ENCODERS.items() for k in _int_keys(p)])
def test_every_integer_arch_field_has_its_range(encoder, key):
    """Sizes and counts from 1 (0 heads or d_kv was a ZeroDivisionError), token ids from 0; all bounded."""
    lo, hi = ARCH_INT_RANGES.get(key, (1, 2**20))
    assert (lo == 0) == key.endswith("_token_id") and hi <= 2**20
    for bad in (lo - 1, hi + 1):
        with pytest.raises(RecipeError, match=rf"model.text_encoder.arch.{key}: expected an integer in \[{lo}, {hi}\]"):
            _config(encoder, {key: bad})


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
@pytest.mark.parametrize(("encoder", "key"), [("t5", "num_heads"), ("t5", "d_kv"), ("t5", "d_model"),
                                              ("clip", "num_attention_heads"), ("clip", "hidden_size")])
def test_a_zero_that_transformers_divides_by_is_refused_by_check(encoder, key, capsys):
    """The tester's cases: each crashed `minfm run` with a ZeroDivisionError."""
    slot = "model.text_encoder" if encoder == "t5" else "model.clip_encoder"
    table = {"name": encoder, **MINIMAL[encoder], "arch": {**MINIMAL[encoder]["arch"], key: 0}}
    assert _runs(encoder, _config(encoder, {})) and not _runs(encoder, _unchecked(encoder, {key: 0}))
    assert main(["check", str(TINY), "--set", f"{slot}={_toml(table)}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{slot}.arch.{key}: expected an integer in [1, " in err, err


def _string_keys():
    for encoder, (_, presets, _) in ENCODERS.items():
        for key in sorted({k for p in presets.values() for k, v in p.items() if isinstance(v, str)}):
            yield encoder, key


@pytest.mark.parametrize(("encoder", "key"), list(_string_keys()))
def test_string_arch_fields_take_exactly_what_transformers_runs(encoder, key):
    """Every activation transformers has (ACT2FN; T5 also gated-<it>) builds and runs; others were a KeyError."""
    good = sorted(activation_names())
    if key == "feed_forward_proj":
        good += [f"gated-{a}" for a in good]
    for value in good:
        assert _runs(encoder, _config(encoder, {key: value})), value
    for value in ("bogus", "gated-bogus", "gated-gelu-x", "x-gelu", "gated", "", "GELU"):
        with pytest.raises(RecipeError, match=f"model.text_encoder.arch.{key}: expected "):
            _config(encoder, {key: value})
        assert not _runs(encoder, _unchecked(encoder, {key: value}))


def _accepted(encoder, arch) -> bool:
    try:
        _config(encoder, arch)
    except RecipeError:
        return False
    return True


def test_t5_relative_buckets_accepted_exactly_where_t5_runs():
    """max_distance <= num_buckets // 4 indexed outside the bucket table (IndexError) or took log(0)."""
    for buckets in range(4, 13):
        for distance in range(1, 6):
            arch = {"relative_attention_num_buckets": buckets, "relative_attention_max_distance": distance}
            assert _accepted("t5", arch) == _runs("t5", _unchecked("t5", arch)), arch


def test_clip_heads_accepted_exactly_where_clip_builds():
    for width in (6, 8, 12):
        for heads in (1, 2, 3, 4, 5):
            arch = {"hidden_size": width, "num_attention_heads": heads}
            assert _accepted("clip", arch) == _runs("clip", _unchecked("clip", arch)), arch
    with pytest.raises(RecipeError, match="model.text_encoder.arch.num_attention_heads: hidden_size = 32 is not "
                                          "divisible by num_attention_heads = 5"):
        _config("clip", {"num_attention_heads": 5})


def test_a_token_id_must_be_in_the_vocabulary():
    with pytest.raises(RecipeError, match=r"model.text_encoder.arch.eos_token_id: 64 is not a token of the "
                                          r"vocabulary \(vocab_size = 64\)"):
        _config("clip", {"eos_token_id": 64})


@pytest.mark.parametrize("encoder", ["t5", "clip"])
def test_a_tokenizer_larger_than_the_vocabulary_is_refused_at_build(encoder, tmp_path):
    """Token ids past vocab_size indexed outside the embedding table at the first batch (IndexError)."""
    from encoder_fixtures import clip_tokenizer, t5_tokenizer
    from transformers import AutoTokenizer

    from minfm_plugins.text_encoders.clip import build_clip
    from minfm_plugins.text_encoders.t5 import build_t5

    make, build, cls, arch = {"t5": (t5_tokenizer, build_t5, T5EncoderConfig, T5_ARCH),
                              "clip": (clip_tokenizer, build_clip, ClipEncoderConfig, CLIP_ARCH)}[encoder]
    folder = make(tmp_path)
    n = len(AutoTokenizer.from_pretrained(str(folder)))
    small = {**arch, "vocab_size": n - 1}
    if encoder == "clip":  # its special token ids must stay inside the smaller table
        small.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg = structure({"pretrained": None, "tokenizer": str(folder), "dtype": "fp32", "arch": small}, cls)
    with pytest.raises(MinfmError, match=rf"has {n} tokens but the encoder's vocab_size is {n - 1}"):
        build(cfg, load_weights=True)
    ok = structure({"pretrained": None, "tokenizer": str(folder), "dtype": "fp32", "arch": {**small, "vocab_size": n}}, cls)
    out = build(ok, load_weights=True)(["a red circle"])  # T5: (tokens, lens); CLIP: pooled
    assert (out[0] if encoder == "t5" else out).shape[-1] == ok.dim


def test_clip_truncates_to_its_position_table():
    """A tiny CLIP with fewer positions than max_length: a long prompt was a ValueError in transformers."""
    from encoder_fixtures import WORDS, clip_tokenizer
    from minfm_plugins.text_encoders.clip import build_clip

    def run(tmp):
        cfg = structure({"pretrained": None, "tokenizer": str(clip_tokenizer(tmp)), "dtype": "fp32", "arch": CLIP_ARCH},
                        ClipEncoderConfig)
        assert cfg.max_length > CLIP_ARCH["max_position_embeddings"]
        return build_clip(cfg, load_weights=False)([" ".join(WORDS * 2)])

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        assert run(tmp).shape == (1, CLIP_ARCH["hidden_size"])
