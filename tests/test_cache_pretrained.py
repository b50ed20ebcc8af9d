"""Pretrained-weight resolution: local paths, Hub references, and the one-line offline error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from minfm_core.errors import MinfmError
from minfm_core.pretrained import HubRef, parse_hub_ref, pretrained_refs, resolve_pretrained


@pytest.mark.parametrize(
    "ref, want",
    [
        ("org/name", HubRef("org/name")),
        ("black-forest-labs/FLUX.1-dev/vae", HubRef("black-forest-labs/FLUX.1-dev", None, "vae")),
        ("org/name@v1.0/sub/ae.safetensors", HubRef("org/name", "v1.0", "sub/ae.safetensors")),
        ("/abs/path", None),
        ("./rel/path", None),
        ("~/x/y", None),
        ("justone", None),
        ("org/name/../etc", None),
    ],
)
def test_parse_hub_ref(ref, want):
    assert parse_hub_ref(ref) == want
    if want is not None:
        assert str(want) == ref


def test_local_paths_win(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    assert resolve_pretrained(str(tmp_path / "vae")) == tmp_path / "vae"
    assert resolve_pretrained(str(tmp_path / "vae"), "config.json") == tmp_path / "vae" / "config.json"
    with pytest.raises(MinfmError, match="has no weights.safetensors"):
        resolve_pretrained(str(tmp_path / "vae"), "weights.safetensors")
    with pytest.raises(MinfmError, match="no such file or directory"):
        resolve_pretrained(str(tmp_path / "missing"))


def test_pretrained_refs_of_a_config():
    class WithField:
        pretrained = "org/model"

    class WithProperty:
        pretrained = "ignored/here"
        pretrained_refs = ("org/a", "", "org/b")

    assert pretrained_refs(WithField()) == ("org/model",)
    assert pretrained_refs(WithProperty()) == ("org/a", "org/b")
    assert pretrained_refs(object()) == ()


def offline_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def test_offline_uncached_reference_is_one_clear_error(tmp_path):
    code = textwrap.dedent(
        """
        from minfm_core.errors import MinfmError
        from minfm_plugins.text_encoders.configs import T5EncoderConfig
        from minfm_plugins.text_encoders.t5 import build_t5
        try:
            build_t5(T5EncoderConfig(pretrained="nobody/t5-not-cached"))
        except MinfmError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert msg.startswith("nobody/t5-not-cached: not a local path and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in msg and "minfm cache models RECIPE" in msg
    assert "minfm hub pull nobody/t5-not-cached" in msg and "hf download nobody/t5-not-cached" in msg


RECIPE = """
[model.denoiser]
name = "flux"
flavor = "flux-debug"
d_img = 12
d_txt = 32
d_vec = 32

[model.text_encoder]
name = "t5"
pretrained = "nobody/t5-not-cached"
variant = "t5-v1_1-small"
arch = {d_model = 32, d_ff = 64, num_heads = 4, d_kv = 8, num_layers = 2}

[model.clip_encoder]
name = "vocab"
dim = 32
pooled = true

[model.vae]
name = "identity"

[model.patchifier]
name = "patch3d"
patch_size = [1, 2, 2]

[data]
name = "shapes"  # a train job needs data: `minfm check` applies the rules `minfm run` does
"""


def test_cli_offline_not_cached_exits_2_with_one_line(tmp_path, minfm):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    env = offline_env(tmp_path)
    # the recipe itself is fine: check never reads weights
    ok = minfm("check", str(recipe), env=env)
    assert ok.returncode == 0, ok.stderr
    out = minfm("cache", "models", str(recipe), env=env)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    # not the advice each reference's own error gives (fetch it by `minfm cache models RECIPE`, this command)
    assert lines[0] == ("minfm: error: not in the Hugging Face cache, and the Hub is offline (HF_HUB_OFFLINE=1): "
                        "nobody/t5-not-cached; unset HF_HUB_OFFLINE for minfm cache models to fetch it")


def test_cli_names_every_missing_reference_in_one_line(tmp_path, minfm):
    """One unfetchable reference (here a class table not written yet) does not hide the others."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace('name = "vocab"\ndim = 32\npooled = true', 'name = "class_embedding"\n'
                                     'embeddings = "data/nowhere/class_embeddings.safetensors"\ndim = 32\npooled = true'))
    out = minfm("cache", "models", str(recipe), env=offline_env(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0] == ("minfm: error: not in the Hugging Face cache, and the Hub is offline (HF_HUB_OFFLINE=1): "
                        "nobody/t5-not-cached, data/nowhere/class_embeddings.safetensors (nor a local file); "
                        "unset HF_HUB_OFFLINE for minfm cache models to fetch them")


def test_hub_references_go_through_the_hf_source(tmp_path):
    """The core hands ``org/name[@rev][/path]`` to whatever source holds the ``hf`` scheme,
    with the declared ``subpath`` keyword; it never reaches the Hub itself."""
    from minfm_core import hookimpl
    from minfm_core.pretrained import resolve_pretrained
    from minfm_core.testing import check_source, isolated_registry

    calls = []
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")

    def resolve(uri, *, training_state=False, subpath=None):
        calls.append((uri, training_state, subpath))
        return tmp_path / subpath if subpath is not None else tmp_path

    class Mirror:  # a third party's source for the same scheme, e.g. an internal mirror
        @hookimpl
        def register_sources(self, register):
            register("hf", resolve)

    with isolated_registry(("mirror", Mirror())) as reg:
        check_source(reg.get("source", "hf"))
        assert resolve_pretrained("org/name@v1/vae") == tmp_path / "vae"
        assert resolve_pretrained("org/name/vae", "config.json") == tmp_path / "vae" / "config.json"
        assert resolve_pretrained("org/name") == tmp_path
    assert calls == [("hf://org/name@v1", False, "vae"), ("hf://org/name", False, "vae/config.json"),
                     ("hf://org/name", False, "")]


def test_a_uri_reference_goes_to_its_schemes_source(tmp_path):
    """`pretrained = "mirror://..."` was taken for a Hub id and refused ("no such file or
    directory"), so a third party's source could serve checkpoints but not pretrained weights.
    Another scheme's URI goes to that scheme's resolver whole, with subpath= the file asked
    for ("" for what it names); hf:// is the Hub reference without its scheme."""
    from minfm_core import hookimpl
    from minfm_core.pretrained import resolve_pretrained
    from minfm_core.testing import isolated_registry

    calls = []
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")

    def resolve(uri, *, training_state=False, subpath=None):
        calls.append((uri, subpath))
        return tmp_path / "vae" / subpath

    class Mirror:
        @hookimpl
        def register_sources(self, register):
            register("mirror", resolve)
            register("hf", resolve)

    with isolated_registry(("mirror", Mirror())):
        assert resolve_pretrained("mirror://models/flux-vae") == tmp_path / "vae"
        assert resolve_pretrained("mirror://models/flux-vae", "config.json") == tmp_path / "vae" / "config.json"
        assert resolve_pretrained("hf://org/name@v1/sub", "config.json") == tmp_path / "vae" / "sub/config.json"
        with pytest.raises(MinfmError, match="nosuch"):
            resolve_pretrained("nosuch://x/y")
    assert calls == [("mirror://models/flux-vae", ""), ("mirror://models/flux-vae", "config.json"),
                     ("hf://org/name@v1", "sub/config.json")]


def test_a_recipe_from_outside_names_hf_sources_only(tmp_path):
    """A pulled recipe is hostile: a plugin's resolver is not held to the hf source's rules
    (safetensors only, bounded sizes), so only the user's own --set may name one."""
    from minfm_core.recipe import load_recipe

    from conftest import ROOT

    recipe = (ROOT / "recipes" / "quickstart.toml").read_text().replace("[sample]\n", "[sample]\nsource = \"{}\"\n")
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for source in ("mirror://evil/ckpt", "s3://bucket/x"):
        (pulled / "recipe.toml").write_text(recipe.format(source))
        with pytest.raises(MinfmError, match=rf"sample.source: refusing source '{source}': a recipe from outside "
                                              r"may name hf:// sources only"):
            load_recipe(pulled / "recipe.toml", untrusted_root=pulled)
    ok = load_recipe(pulled / "recipe.toml", ["sample.source='mirror://mine/ckpt'"], untrusted_root=pulled)
    assert ok.recipe.sample.source == "mirror://mine/ckpt"
    (pulled / "recipe.toml").write_text(recipe.format("hf://org/name"))
    assert load_recipe(pulled / "recipe.toml", untrusted_root=pulled).recipe.sample.source == "hf://org/name"


def test_a_source_without_subpath_fails_the_conformance_check():
    import pytest

    from minfm_core.testing import check_source

    def old_resolver(uri, *, training_state=False):
        return uri

    with pytest.raises(AssertionError, match="subpath="):
        check_source(old_resolver)


def test_missing_weights_leave_no_sample_folder(tmp_path, minfm):
    """A sample job claimed its out folder (lock, metadata.json, images/) before it built the
    models, so unreachable weights left a half-made folder behind (`minfm sample` draws
    through the same code)."""
    from conftest import ROOT

    tiny, exp = ROOT / "tests" / "recipes" / "tiny.toml", tmp_path / "exp"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'extends = "{tiny}"\njob = "sample"\n[run]\nexp_dir = "{exp}"\n'
                      '[model.denoiser]\npretrained = "nobody/flux-not-cached"\n')
    res = minfm("run", str(recipe), env=offline_env(tmp_path))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("minfm: error: model.denoiser: nobody/flux-not-cached/flux1-dev.safetensors: "
                                 "not a local path and not in the Hugging Face cache"), res.stderr
    assert not exp.exists()
