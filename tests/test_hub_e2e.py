"""A trained run travels as a Hub repo: push the run dir, sample from hf://, same pictures."""

from __future__ import annotations

import json

import pytest

from conftest import minfm_in_process, run_minfm
from engine_helpers import tiny
from minfm_core.engine.train import train


@pytest.mark.slow
def test_push_run_then_sample_from_hub_gives_identical_images(hub_server, tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=3", "train.sample_every=3"))
    env = hub_server.env(tmp_path / "hf_home")

    pushed = run_minfm("hub", "push", str(run), "org/shapes-tiny", env=env)
    assert pushed.returncode == 0, pushed.stderr
    files = set(hub_server.files("org/shapes-tiny"))
    assert {"model.safetensors", "ema.safetensors", "recipe.toml", "README.md", "metrics.jsonl", "samples.png"} <= files
    assert not any(f.startswith("checkpoint/") for f in files)  # training state only when asked

    again = run_minfm("hub", "push", str(run), "org/shapes-tiny", env=env)
    assert again.returncode == 0 and "nothing to push" in again.stdout + again.stderr

    args = ["--prompt", "a red circle", "--prompt", "a blue square", "--n", "2", "--steps", "3"]
    local = run_minfm("sample", str(run), "--out", str(tmp_path / "local"), *args, env=env)
    assert local.returncode == 0, local.stderr
    remote = run_minfm("sample", "hf://org/shapes-tiny", "--out", str(tmp_path / "remote"), *args, env=env)
    assert remote.returncode == 0, remote.stderr

    meta_local = json.loads((tmp_path / "local" / "metadata.json").read_text())
    meta_remote = json.loads((tmp_path / "remote" / "metadata.json").read_text())
    assert meta_local["images"] == meta_remote["images"] and len(meta_local["images"]) == 4
    assert meta_local["settings"]["weights"] == meta_remote["settings"]["weights"] == "ema"
    for rec in meta_local["images"]:
        assert (tmp_path / "local" / rec["path"]).read_bytes() == (tmp_path / "remote" / rec["path"]).read_bytes()
    assert (tmp_path / "remote" / "index.html").is_file()


def test_sample_bad_prompt_file_exit_2(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=1"))
    res = minfm_in_process("sample", str(run), "--prompt-file", str(tmp_path / "missing.txt"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"minfm: error: {tmp_path / 'missing.txt'}: prompt file: No such file or directory"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = minfm_in_process("sample", str(run), "--prompt-file", str(empty))
    assert res.returncode == 2 and "prompt file has no prompts" in res.stderr


def test_export_diffusers_from_a_run(tmp_path):
    """`minfm export diffusers RUN OUT` writes what diffusers loads, with the run's EMA weights."""
    import torch
    from diffusers import FluxTransformer2DModel

    from minfm_core import checkpoint as ck

    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=2"))
    res = run_minfm("export", "diffusers", str(run), str(tmp_path / "out"), "--ema")
    assert res.returncode == 0, res.stderr
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "out")
    ours = ck.build_denoiser(run / "recipe.toml")
    ck.load_weights(ck.find_checkpoint(run), ours, source="ema")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ours.parameters())
    # The image input projection is one tensor in both layouts.
    torch.testing.assert_close(model.x_embedder.weight, ours.img_in.weight)


@pytest.mark.slow
def test_resume_training_from_a_pulled_repo(hub_server, tmp_path):
    """Push with --include-training-state; a new run with init_from=hf://... continues the step count."""
    from engine_helpers import TINY, read_metrics

    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=3", "train.ckpt_every=3"))
    env = hub_server.env(tmp_path / "hf_home")
    res = run_minfm("hub", "push", str(run), "org/resumable", "--include-training-state", env=env)
    assert res.returncode == 0, res.stderr
    assert any(f.startswith("checkpoint/") for f in hub_server.files("org/resumable"))
    cont = tmp_path / "cont"
    res = run_minfm("run", str(TINY), "--set", f"run.exp_dir={cont}", "--set", "train.max_steps=5",
                    "--set", "train.init_from=hf://org/resumable", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m["step"] for m in read_metrics(cont) if "loss" in m] == [4, 5]  # continued from step 3

    # Weights only (the default pull has no training state): start a fresh run from the EMA.
    fresh = tmp_path / "fresh"
    res = run_minfm("run", str(TINY), "--set", f"run.exp_dir={fresh}", "--set", "train.max_steps=1",
                    "--set", "train.init_from=hf://org/resumable", "--set", "train.init_load_plan='ema:model'", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m["step"] for m in read_metrics(fresh) if "loss" in m] == [1]


@pytest.mark.slow
def test_push_with_a_diffusers_folder(hub_server, tmp_path):
    """`--diffusers` adds transformer/ that diffusers loads straight from the pulled repo."""
    from diffusers import FluxTransformer2DModel

    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=1"))
    env = hub_server.env(tmp_path / "hf_home")
    res = run_minfm("hub", "push", str(run), "org/with-diffusers", "--diffusers", env=env)
    assert res.returncode == 0, res.stderr
    # stdout is the pushed commit alone (the export's "wrote <temporary folder>" came first)
    assert res.stdout.strip() == f"hf://org/with-diffusers@{hub_server.head('org/with-diffusers')}"
    assert {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} <= set(
        hub_server.files("org/with-diffusers"))
    pulled = tmp_path / "pulled"
    res = run_minfm("hub", "pull", "org/with-diffusers", "--local-dir", str(pulled), env=env)
    assert res.returncode == 0, res.stderr
    model = FluxTransformer2DModel.from_pretrained(pulled / "transformer")
    assert model.config.num_layers == 1 and model.config.num_single_layers == 1
