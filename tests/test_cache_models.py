"""`minfm cache models` against a local Hub-compatible server, then offline loading from the cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from encoder_fixtures import CLIP_ARCH, T5_ARCH, clip_tokenizer, t5_tokenizer

REPO = "tiny-org/tiny-flux"
VAE_ARCH = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4)
PROMPTS = ["a red circle", "", "a small blue square on a yellow background"]


def _toml_table(d: dict) -> str:
    import tomli_w

    return tomli_w.dumps({"x": d}).split("\n", 1)[1]


def recipe_text(vae_ref: str = REPO) -> str:
    return f"""
[model.denoiser]
name = "flux"
flavor = "flux-debug"
d_txt = 32
d_vec = 32
d_img = 16

[model.vae]
name = "flux_ae"
pretrained = "{vae_ref}"
dtype = "fp32"
sample_posterior = false
{_toml_table(VAE_ARCH)}
[model.text_encoder]
name = "t5"
pretrained = "{REPO}/text_encoder_2"
variant = "t5-v1_1-small"
dtype = "fp32"
arch = {{ {", ".join(f"{k} = {v}" for k, v in T5_ARCH.items())} }}

[model.clip_encoder]
name = "clip"
pretrained = "{REPO}/text_encoder"
dtype = "fp32"
arch = {{ {", ".join(f"{k} = {v}" for k, v in CLIP_ARCH.items())} }}

[model.patchifier]
name = "patch3d"
patch_size = [1, 2, 2]
"""


def _folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A FLUX-like diffusers pipeline folder with tiny random T5, CLIP and VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from minfm_plugins.text_encoders.presets import T5_PRESETS
    from minfm_plugins.vae.configs import FluxAEConfig
    from minfm_plugins.vae.flux_ae import diffusers_config

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(**{**T5_PRESETS["t5-v1_1-small"], **T5_ARCH})).save_pretrained(root / "text_encoder_2")
    CLIPTextModel(CLIPTextConfig(**CLIP_ARCH)).save_pretrained(root / "text_encoder")
    t5_tokenizer(root / "tokenizer_2")
    clip_tokenizer(root / "tokenizer")
    cfg = FluxAEConfig(pretrained=None, **{**VAE_ARCH, "block_out_channels": (8, 16)})
    AutoencoderKL(**diffusers_config(cfg)).save_pretrained(root / "vae")
    return root


def _repo_files(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {"model_index.json": b'{"_class_name": "FluxPipeline"}'}
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        files.update(_folder_files(root / sub, sub))
    # things a cache of this recipe must never download
    files["transformer/diffusion_pytorch_model.safetensors"] = b"not needed by this recipe"
    files["text_encoder_2/pytorch_model.bin"] = b"pickled weights are never fetched"
    files["vae/nested/extra.safetensors"] = b"only a folder's direct children are fetched"
    return files


BUILD_AND_ENCODE = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from minfm_core.recipe import load_recipe
    r = load_recipe(sys.argv[1])
    t5, clip, vae = (r.build(p) for p in ("model.text_encoder", "model.clip_encoder", "model.vae"))
    tokens, lens = t5(%(prompts)r)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    save_file({"t5": tokens, "lens": lens, "clip": clip(%(prompts)r), "z": vae.encode([img])[0]}, sys.argv[2])
    """
) % {"prompts": PROMPTS}


def _expected(root: Path, recipe: Path) -> dict[str, torch.Tensor]:
    """The same encodings from the local pipeline folder (no Hub involved)."""
    text = recipe.read_text().replace(REPO, str(root))
    local = recipe.with_name("local.toml")
    local.write_text(text)
    out = recipe.with_name("expected.safetensors")
    subprocess.run([sys.executable, "-c", BUILD_AND_ENCODE, str(local), str(out)], check=True, timeout=300)
    from safetensors.torch import load_file

    return load_file(out)


@pytest.mark.slow
def test_cache_models_fetches_what_the_recipe_names_then_runs_offline(hub_server, tiny_pipeline, tmp_path, minfm):
    hub_server.upload(REPO, _repo_files(tiny_pipeline))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text())
    hf_home = tmp_path / "hf_home"

    out = minfm("cache", "models", str(recipe), env=hub_server.env(hf_home))
    assert out.returncode == 0, out.stderr
    for ref in (f"{REPO}/vae", f"{REPO}/text_encoder_2", f"{REPO}/tokenizer_2", f"{REPO}/text_encoder", f"{REPO}/tokenizer"):
        assert f": {ref} -> " in out.stdout
    assert "5 Hub reference(s)" in out.stdout

    downloaded = {p for m, p in hub_server.requests if m == "GET" and "/resolve/" in p}
    assert any(p.endswith("/vae/diffusion_pytorch_model.safetensors") for p in downloaded)
    assert any(p.endswith("/tokenizer_2/tokenizer.json") for p in downloaded)
    for never in ("transformer/", "pytorch_model.bin", "nested/", "model_index.json"):
        assert not any(never in p for p in downloaded), (never, downloaded)

    # later runs work offline, from the cache alone, and give what the local folders give
    offline = hub_server.env(hf_home, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    before = len(hub_server.requests)
    check = minfm("cache", "models", str(recipe), env=offline)
    assert check.returncode == 0 and "5 Hub reference(s) in the Hugging Face cache" in check.stdout, check.stderr
    got_file = tmp_path / "got.safetensors"
    run = subprocess.run([sys.executable, "-c", BUILD_AND_ENCODE, str(recipe), str(got_file)], env=offline,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert len(hub_server.requests) == before  # offline means offline

    from safetensors.torch import load_file

    got, want = load_file(got_file), _expected(tiny_pipeline, recipe)
    assert got["lens"].tolist() == [4, 1, 9]
    for key in ("t5", "lens", "clip", "z"):
        torch.testing.assert_close(got[key], want[key])


def test_cache_models_names_a_missing_repo(hub_server, tmp_path, minfm):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text())
    out = minfm("cache", "models", str(recipe), env=hub_server.env(tmp_path / "hf_home"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert f"{REPO}/vae: Hub repo {REPO} not found at http://127.0.0.1" in out.stderr
    assert "HF_HUB_OFFLINE" not in out.stdout  # offline runs would miss what failed


def test_cache_models_offline_names_what_is_not_cached_once(tmp_path, minfm):
    """Each uncached reference's error advised `minfm cache models RECIPE`, the command that
    failed, in one ~2 KB line: now one sentence lists them and says to unset HF_HUB_OFFLINE."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text())
    out = minfm("cache", "models", str(recipe), env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    refs = ", ".join(f"{REPO}/{sub}" for sub in ("vae", "text_encoder_2", "tokenizer_2", "text_encoder", "tokenizer"))
    assert out.stderr.strip() == (f"minfm: error: not in the Hugging Face cache, and the Hub is offline "
                                  f"(HF_HUB_OFFLINE=1): {refs}; unset HF_HUB_OFFLINE for minfm cache models "
                                  "to fetch them")


LOAD_DENOISER = textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    from minfm_core.recipe import load_recipe
    model = load_recipe(sys.argv[1])["model.denoiser"].build(load_weights=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
    """
)


@pytest.mark.parametrize("ref", ["tiny-org/bfl", "tiny-org/bfl/flux1-dev.safetensors"], ids=["repo", "file"])
def test_a_flux_repo_or_its_file_is_fetched_then_loads_offline(hub_server, tmp_path, minfm, ref):
    """recipes/flux_dev_inference.toml names `black-forest-labs/FLUX.1-dev/flux1-dev.safetensors`:
    `cache models` fetched that file, then loading asked the Hub for
    `flux1-dev.safetensors/flux1-dev.safetensors`, online and offline alike."""
    from conftest import ROOT
    from minfm_plugins.flux.model import build_flux
    from safetensors.torch import load_file, save

    from minfm_core.recipe import load_recipe

    tiny = ROOT / "tests" / "recipes" / "tiny.toml"
    torch.manual_seed(0)
    model = build_flux(load_recipe(tiny).slots["model.denoiser"].config)
    want = {k: v.contiguous() for k, v in model.state_dict().items()}
    hub_server.upload("tiny-org/bfl", {
        "flux1-dev.safetensors": save(want),
        "ae.safetensors": b"the rest of a FLUX.1 repo, never fetched for the denoiser",
    })
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'extends = "{tiny}"\n[model.denoiser]\npretrained = "{ref}"\n')
    hf_home = tmp_path / "hf_home"

    out = minfm("cache", "models", str(recipe), env=hub_server.env(hf_home))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": tiny-org/bfl/flux1-dev.safetensors -> ") == 1
    assert not any("ae.safetensors" in p for m, p in hub_server.requests if m == "GET")

    offline = hub_server.env(hf_home, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    got = tmp_path / "got.safetensors"
    run = subprocess.run([sys.executable, "-c", LOAD_DENOISER, str(recipe), str(got)], env=offline,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = load_file(got)
    assert loaded.keys() == want.keys()
    for k in want:
        assert torch.equal(loaded[k], want[k]), k


def test_a_file_two_slots_name_is_listed_once(tmp_path, monkeypatch, capsys):
    """The ImageNet recipe's text and CLIP encoders read one class table: it was named twice."""
    from minfm_core.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "models", "minfm:flux_tiny_imagenet.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("data/imagenet/class_embeddings.safetensors") == 1, err
