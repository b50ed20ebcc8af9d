"""Hostile Hub repos and folders, served by the test Hub and driven through the real client.

Every refusal: exit 2, one ``minfm: error:`` line naming the file, no traceback, the canary
never created, nothing written outside, nothing half-written. The commands run through
``minfm_core.cli.main.main`` in one Python process per test (tests/hub_helpers.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hub_fixtures import hostile_safetensors, pickle_bomb, shard_index
from hub_helpers import (
    TOKEN, env_for, main_in_process, make_model_folder, one_error_line, tiny_denoiser_weights, tiny_recipe_text,
    tree_bytes,
)
from safetensors.torch import save_file

pytest_plugins = ["hub_fixtures"]


def listing(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (symlinks as their target text), to see that nothing changed."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def _outside(tmp_path: Path) -> Path:
    """A folder next to everything, holding a file a hostile path would like to reach."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim.json").write_text('{"keep": true}\n')
    save_file({"w": torch.ones(2)}, out / "real.safetensors")
    return out


def _no_token(*procs) -> None:
    for p in procs:
        assert TOKEN not in p.stdout and TOKEN not in p.stderr


# -- hub pull ----------------------------------------------------------------------------------

TRAVERSAL = ["../evil.json", "sub/../../evil.json", "ABS", "..\\evil.json", "a//b.json", "./evil.json",
             "C:/evil.json", "a\nb.json", "\u202eevil.json", "x" * 300 + ".json", "model.safetensors/evil.json"]


def test_traversal_names_in_a_repo_are_refused_before_downloading(hub_server, tmp_path, canary):
    outside = _outside(tmp_path)
    before = listing(outside)
    env = env_for(hub_server, tmp_path)
    cases, names = [], []
    for i, name in enumerate(TRAVERSAL):
        name = str(outside / "evil.json") if name == "ABS" else name
        hub_server.upload(f"org/t{i}", {"model.safetensors": b"x", name: b'{"evil": 1}'})
        names.append(name)
        cases += [["hub", "pull", f"org/t{i}", "--local-dir", str(tmp_path / f"out{i}")], ["hub", "pull", f"org/t{i}"]]
    n_before = len(hub_server.requests)
    results = main_in_process(env, *cases)
    for i, name in enumerate(names):
        for proc in results[2 * i:2 * i + 2]:
            line = one_error_line(proc)
            assert f"Hub repo org/t{i}: refusing file name {repr(name)[:60]}" in line and len(line) < 300, line
        assert not (tmp_path / f"out{i}").exists()
    assert not any("/resolve/" in path for _, path in hub_server.requests[n_before:])  # nothing downloaded
    assert not (tmp_path / "home" / "hub" / "models--org--t0" / "snapshots").exists()
    assert listing(outside) == before and not (tmp_path / "evil.json").exists()
    _no_token(*results)


def test_pull_bounds_are_checked_before_downloading(hub_server, tmp_path):
    hub_server.upload("org/big", {"model.safetensors": b"x" * 1000, "a.json": b"{}", "b.txt": b"hi",
                                  "skip.dat": b"not downloaded, not counted"})
    env = env_for(hub_server, tmp_path)
    n_before = len(hub_server.requests)
    few, small, ok = main_in_process(
        env,
        ["hub", "pull", "org/big", "--max-files", "2", "--local-dir", str(tmp_path / "a")],
        ["hub", "pull", "org/big", "--max-bytes", "1KB", "--local-dir", str(tmp_path / "b")],
        ["hub", "pull", "org/big", "--max-files", "3", "--max-bytes", "1004", "--local-dir", str(tmp_path / "d")],
    )
    assert "Hub repo org/big: 3 files to download, more than the limit of 2 (raise it with --max-files" in \
        one_error_line(few)
    assert "Hub repo org/big: 1004 bytes to download, more than the limit of 1000" in one_error_line(small)
    assert ok.returncode == 0, ok.stderr
    assert set(tree_bytes(tmp_path / "d")) == {"model.safetensors", "a.json", "b.txt"}
    assert [p for _, p in hub_server.requests[n_before:] if "/resolve/" in p and "skip.dat" in p] == []
    (env_few,) = main_in_process({**env, "MINFM_HUB_MAX_FILES": "1"}, ["hub", "pull", "org/big"])
    assert "more than the limit of 1 " in one_error_line(env_few)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # A limit that would refuse every pull is a typo: refused before the Hub is asked.
    n_before = len(hub_server.requests)
    (zero_files,) = main_in_process({**env, "MINFM_HUB_MAX_FILES": "0"}, ["hub", "pull", "org/big"])
    zero_bytes, junk = main_in_process(env, ["hub", "pull", "org/big", "--max-bytes", "0"],
                                       ["hub", "pull", "org/big", "--max-files", "2e3"])
    assert one_error_line(zero_files) == ("minfm: error: invalid file count '0' (MINFM_HUB_MAX_FILES / --max-files): "
                                          "expected an integer from 1 to 10000000")
    assert one_error_line(zero_bytes) == ("minfm: error: invalid size '0' (MINFM_HUB_MAX_BYTES / --max-bytes): "
                                          "expected 1 byte to 1PiB (1125899906842624 bytes)")
    assert one_error_line(junk) == "minfm: error: --max-files: expected an integer, got '2e3'"
    assert hub_server.requests[n_before:] == []


@pytest.mark.parametrize("victim", ["model.safetensors", "minfm_source.json"])
def test_a_local_dir_symlink_leading_outside_is_refused(hub_server, tmp_path, victim):
    outside = _outside(tmp_path)
    before = listing(outside)
    hub_server.upload("org/m", {"model.safetensors": b"new weights", "recipe.toml": b'job = "train"\n'})
    target = tmp_path / "target"
    target.mkdir()
    (target / victim).symlink_to(outside / "victim.json")
    (target / "notes.txt").write_text("mine\n")
    target_before = listing(target)
    (proc,) = main_in_process(env_for(hub_server, tmp_path), ["hub", "pull", "org/m", "--local-dir", str(target)])
    line = one_error_line(proc)
    assert f"refusing path '{victim}': a symlink leads outside {target}" in line, line
    assert listing(outside) == before and listing(target) == target_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".target")] == []  # no temp folder left


def test_pull_into_an_existing_local_dir_replaces_an_inside_symlink_and_keeps_the_rest(hub_server, tmp_path):
    hub_server.upload("org/m", {"model.safetensors": b"new weights", "recipe.toml": b'job = "train"\n'})
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("mine\n")
    (target / "recipe.toml").symlink_to("mine.txt")  # inside: replaced, never written through
    (proc,) = main_in_process(env_for(hub_server, tmp_path), ["hub", "pull", "org/m", "--local-dir", str(target)])
    assert proc.returncode == 0, proc.stderr
    assert (target / "mine.txt").read_text() == "mine\n"
    assert not (target / "recipe.toml").is_symlink() and (target / "recipe.toml").read_text() == 'job = "train"\n'
    assert json.loads((target / "minfm_source.json").read_text())["repo_id"] == "org/m"


def test_minfm_source_json_never_overwrites_a_cache_blob(hub_server, tmp_path):
    """A repo shipping its own minfm_source.json: in the cache that name is a link to a shared blob."""
    theirs = b'{"repo_id": "someone/else", "commit": "x", "uri": "hf://someone/else@x"}\n'
    sha = hub_server.upload("org/src", {"model.safetensors": b"w", "minfm_source.json": theirs})
    env = env_for(hub_server, tmp_path)
    (proc,) = main_in_process(env, ["hub", "pull", "org/src"])
    assert proc.returncode == 0, proc.stderr
    snap = Path(proc.stdout.strip())
    assert snap.name == sha
    record = snap / "minfm_source.json"
    assert not record.is_symlink() and json.loads(record.read_text())["repo_id"] == "org/src"
    blobs = snap.parent.parent / "blobs"
    assert theirs in [b.read_bytes() for b in blobs.iterdir()]  # the blob still holds the repo's bytes


def test_a_failed_pull_leaves_the_target_as_it_was(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    hub_server.upload("org/m", {"model.safetensors": b"v1", "recipe.toml": b"one = 1\n"})
    target = tmp_path / "target"
    (ok,) = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(target)])
    assert ok.returncode == 0, ok.stderr
    before = listing(target)
    sha = hub_server.upload("org/m", {"model.safetensors": b"v2", "recipe.toml": b"two = 2\n", "z.json": b"{}"})
    hub_server.fail_downloads("z.json")
    local, cache = main_in_process(env, ["hub", "pull", "org/m", "--local-dir", str(target)], ["hub", "pull", "org/m"])
    assert "HTTP 500" in one_error_line(local) and "HTTP 500" in one_error_line(cache)
    assert listing(target) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".target")] == []
    repo_cache = tmp_path / "home" / "hub" / "models--org--m"
    assert not (repo_cache / "snapshots" / sha).exists()
    assert [b.name for b in (repo_cache / "blobs").iterdir()] == [] if (repo_cache / "blobs").exists() else True


# -- weights from a repo: minfm sample hf://, train.init_from -----------------------------------

@pytest.mark.slow
def test_hostile_weights_in_a_repo_end_in_one_line(hub_server, tmp_path, canary):
    """random bytes, a pickle renamed model.safetensors, an oversized header, index traversal."""
    outside = _outside(tmp_path)
    recipe = tiny_recipe_text()
    good = tiny_denoiser_weights(recipe, tmp_path)
    save_file({"w": torch.ones(2)}, outside / "real.safetensors")
    repos: dict[str, dict[str, bytes]] = {
        f"org/{k}": {"model.safetensors": v, "recipe.toml": recipe.encode()}
        for k, v in hostile_safetensors(canary).items()
    }
    repos["org/ema-pickle"] = {"model.safetensors": good, "ema.safetensors": pickle_bomb(canary),
                               "recipe.toml": recipe.encode()}
    repos["org/idx-abs"] = {"model.safetensors.index.json": shard_index(str(outside / "real.safetensors")),
                            "recipe.toml": recipe.encode()}
    repos["org/good"] = {"model.safetensors": good, "recipe.toml": recipe.encode()}
    shas = {r: hub_server.upload(r, files) for r, files in repos.items()}
    # relative traversal that really reaches outside/real.safetensors from the cached snapshot
    snap = tmp_path / "home" / "hub" / "models--org--idx-rel" / "snapshots"
    rel_files = {"recipe.toml": recipe.encode()}
    sha = hub_server.upload("org/idx-rel", rel_files)
    rel = os.path.relpath(outside / "real.safetensors", snap / sha)
    hub_server.upload("org/idx-rel", {"model.safetensors.index.json": shard_index(rel)})
    shas["org/idx-rel"] = hub_server.head("org/idx-rel")
    cases = [["sample", f"hf://{r}", "--prompt", "a red circle", "--n", "1", "--steps", "1",
              "--out", str(tmp_path / "out" / r.split("/")[1])] for r in shas]
    results = dict(zip(shas, main_in_process(env_for(hub_server, tmp_path), *cases, hub_only=False)))

    assert results.pop("org/good").returncode == 0  # the same recipe samples when the weights are real
    expect = {"org/random": "model.safetensors: not a safetensors file", "org/pickle": "model.safetensors: not a",
              "org/oversized-header": "model.safetensors: not a safetensors file (header of 1099511627776 bytes",
              "org/truncated": "model.safetensors: not a valid safetensors file",
              "org/bad-json": "model.safetensors: not a valid safetensors file",
              "org/empty": "model.safetensors: not a safetensors file (only 0 bytes)",
              "org/ema-pickle": "ema.safetensors: not a", "org/idx-abs": "it leaves", "org/idx-rel": "it leaves"}
    for repo, proc in results.items():
        line = one_error_line(proc)
        assert expect[repo] in line, (repo, line)
        assert not list((tmp_path / "out" / repo.split("/")[1]).glob("images/*")), line  # no picture drawn
    _no_token(*results.values())


@pytest.mark.slow
def test_init_from_a_hostile_repo_is_one_line(hub_server, tmp_path, canary):
    recipe = tiny_recipe_text()
    hub_server.upload("org/bomb", {"model.safetensors": pickle_bomb(canary), "recipe.toml": recipe.encode()})
    (tmp_path / "r.toml").write_text(recipe)
    (proc,) = main_in_process(env_for(hub_server, tmp_path),
                              ["train", str(tmp_path / "r.toml"), "--set", 'train.init_from="hf://org/bomb"',
                               "--set", "train.init_load_plan=\"model:model\"",
                               "--set", f"run.exp_dir={json.dumps(str(tmp_path / 'exp'))}"], hub_only=False)
    assert "model.safetensors: not a safetensors file" in one_error_line(proc)
    _no_token(proc)


@pytest.mark.slow
def test_a_repo_recipe_never_expands_the_environment(hub_server, tmp_path):
    recipe = tiny_recipe_text(prompts=["${HF_TOKEN:-none}", "${HOME}"])
    good = tiny_denoiser_weights(recipe, tmp_path)
    hub_server.upload("org/env", {"model.safetensors": good, "recipe.toml": recipe.encode()})
    out = tmp_path / "out"
    (proc,) = main_in_process(env_for(hub_server, tmp_path),
                              ["sample", "hf://org/env", "--n", "1", "--steps", "1", "--out", str(out)], hub_only=False)
    _no_token(proc)
    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file()) if out.exists() else b""
    assert TOKEN.encode() not in written and f'"{os.environ["HOME"]}"'.encode() not in written
    assert proc.returncode == 0, proc.stderr
    assert "${HOME}" in json.loads((out / "metadata.json").read_text())["settings"]["prompts"]  # text, not a lookup


# -- hub push ------------------------------------------------------------------------------------

def test_a_token_in_a_pushed_file_is_refused_naming_file_and_line(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    active = make_model_folder(tmp_path / "active")
    with open(active / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "note": f"token={TOKEN}"}) + "\n")
    shaped = make_model_folder(tmp_path / "shaped")
    other = "hf_" + "Q" * 34  # not the active token, but shaped like one
    (shaped / "recipe.toml").write_text((shaped / "recipe.toml").read_text() + f'[extra]\nkey = "{other}"\n')
    in_header = make_model_folder(tmp_path / "header", extras=False)
    save_file({"w": torch.ones(1)}, in_header / "ema.safetensors", metadata={"recipe": f"token = '{TOKEN}'"})
    results = main_in_process(env, *[["hub", "push", str(p), f"org/{p.name}"] for p in (active, shaped, in_header)])
    lines = [one_error_line(p) for p in results]
    assert "metrics.jsonl: refusing to push: a Hugging Face token at line 3: hf_m*** (36 chars)" in lines[0]
    assert "recipe.toml: refusing to push: a Hugging Face token at line 14: hf_Q*** (37 chars)" in lines[1]
    assert "ema.safetensors: refusing to push: a Hugging Face token at byte" in lines[2]
    for p, line in zip(results, lines):
        assert other not in line
    _no_token(*results)
    assert not any(hub_server.has_repo(f"org/{n}") for n in ("active", "shaped", "header"))  # nothing was sent


def test_push_refuses_symlinks_leading_outside_and_uploads_inside_ones(hub_server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.toml").write_text('secret = "do not publish"\n')
    save_file({"w": torch.ones(1)}, outside / "real.safetensors")
    out_recipe = make_model_folder(tmp_path / "out-recipe")
    (out_recipe / "recipe.toml").unlink()
    (out_recipe / "recipe.toml").symlink_to(outside / "secret.toml")
    out_ema = make_model_folder(tmp_path / "out-ema", extras=False)
    (out_ema / "ema.safetensors").unlink()
    (out_ema / "ema.safetensors").symlink_to(outside / "real.safetensors")
    out_ckpt = make_model_folder(tmp_path / "out-ckpt", extras=False)
    (out_ckpt / "checkpoint").symlink_to(outside)
    shard = make_model_folder(tmp_path / "shard", extras=False)
    (shard / "model.safetensors").unlink()
    (shard / "model.safetensors.index.json").write_bytes(shard_index("../outside/real.safetensors"))
    inside = make_model_folder(tmp_path / "inside", extras=False)
    (inside / "ema.safetensors").unlink()
    (inside / "ema.safetensors").symlink_to("model.safetensors")
    env = env_for(hub_server, tmp_path)
    r_recipe, r_ema, r_ckpt, r_shard, r_inside = main_in_process(
        env, ["hub", "push", str(out_recipe), "org/a"], ["hub", "push", str(out_ema), "org/b"],
        ["hub", "push", str(out_ckpt), "org/c", "--include-training-state"],
        ["hub", "push", str(shard), "org/d"], ["hub", "push", str(inside), "org/e"])
    assert "recipe.toml: refusing path 'recipe.toml': a symlink leads outside" in one_error_line(r_recipe)
    assert "ema.safetensors: refusing path 'ema.safetensors': a symlink leads outside" in one_error_line(r_ema)
    assert "a symlink leads outside" in one_error_line(r_ckpt)
    assert "model.safetensors.index.json: refusing path '../outside/real.safetensors': it leaves" in \
        one_error_line(r_shard)
    assert not any(hub_server.has_repo(f"org/{n}") for n in "abcd")
    assert r_inside.returncode == 0, r_inside.stderr
    files = hub_server.files("org/e")
    assert files["ema.safetensors"] == (inside / "model.safetensors").read_bytes()  # the target's content
    for data in (f for r in hub_server.state.repos.values() for c in r.commits.values() for f in c.files.values()):
        assert b"do not publish" not in data


def test_hf_bookkeeping_names_are_refused_and_a_pulled_snapshot_pushes_as_is(hub_server, tmp_path):
    """A repo may not write into huggingface_hub's .cache/; a cache snapshot (links into blobs/) is inside."""
    hub_server.upload("org/cachey", {"model.safetensors": b"x", ".cache/huggingface/download/a.metadata": b"x"})
    src = make_model_folder(tmp_path / "src")
    hub_server.upload("org/m", {p: (src / p).read_bytes() for p in ("model.safetensors", "ema.safetensors",
                                                                  "recipe.toml", "metrics.jsonl")})
    env = env_for(hub_server, tmp_path)
    cachey, pulled = main_in_process(env, ["hub", "pull", "org/cachey", "--local-dir", str(tmp_path / "c")],
                                     ["hub", "pull", "org/m"])
    assert ".cache/ is huggingface_hub's own folder" in one_error_line(cachey)
    assert not (tmp_path / "c").exists()
    snap = Path(pulled.stdout.strip())
    assert (snap / "model.safetensors").is_symlink()
    (pushed,) = main_in_process(env, ["hub", "push", str(snap), "org/copy"])
    assert pushed.returncode == 0, pushed.stderr
    copy = hub_server.files("org/copy")
    assert copy["model.safetensors"] == (src / "model.safetensors").read_bytes()
    assert copy["recipe.toml"] == (src / "recipe.toml").read_bytes()


def test_push_of_broken_files_is_one_line(hub_server, tmp_path, canary):
    """A folder pulled from a stranger and pushed on: its files are read as data, never run."""
    bad_recipe = make_model_folder(tmp_path / "bad-recipe")
    (bad_recipe / "recipe.toml").write_bytes(b'job = "train\n\xff[[[')
    bad_weights = make_model_folder(tmp_path / "bad-weights", extras=False)
    (bad_weights / "ema.safetensors").write_bytes(pickle_bomb(canary))
    r_recipe, r_weights = main_in_process(env_for(hub_server, tmp_path),
                                          ["hub", "push", str(bad_recipe), "org/a"],
                                          ["hub", "push", str(bad_weights), "org/b"])
    assert "recipe.toml: not a valid recipe" in one_error_line(r_recipe)
    assert "ema.safetensors: not a safetensors file" in one_error_line(r_weights)
    assert not hub_server.has_repo("org/a") and not hub_server.has_repo("org/b")


_DEMO_CONFIG = r"""
import json, sys
from minfm_apps.batcher import Batcher
from minfm_apps.demo import build_app
from minfm_apps.model import DemoModel
model = DemoModel.load(sys.argv[1], device="cpu", max_images=2)
app = build_app(model, Batcher(lambda s, jobs, cb: model.run(s, jobs, cb), window_s=0.1, max_batch=2))
print("CONFIG " + json.dumps(app.get_config_file(), default=str))
"""


@pytest.mark.slow
def test_the_demo_config_of_a_repo_recipe_shows_no_secret(hub_server, tmp_path):
    """A repo's recipe asking for ${HF_TOKEN} / ${HOME}: the demo's /config (every visitor sees it) stays clean."""
    pytest.importorskip("gradio")
    import subprocess
    import sys

    recipe = tiny_recipe_text(neg_prompt="${HF_TOKEN:-none}", prompts=["${HOME}"])
    hub_server.upload("org/env", {"model.safetensors": tiny_denoiser_weights(recipe, tmp_path),
                                  "recipe.toml": recipe.encode()})
    env = env_for(hub_server, tmp_path)
    proc = subprocess.run([sys.executable, "-c", _DEMO_CONFIG, "hf://org/env"], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = [ln for ln in proc.stdout.splitlines() if ln.startswith("CONFIG ")][-1]
    assert TOKEN not in config and TOKEN not in proc.stderr
    assert "${HF_TOKEN:-none}" in config  # the recipe's text, shown as text
    assert f'"{os.environ["HOME"]}"' not in config
