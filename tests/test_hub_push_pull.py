"""`minfm hub push` / `pull` and `hf://` sources, end to end against the local test Hub.

The real huggingface_hub client runs in the `minfm` subprocess; tests/hubserver.py plays
the Hub and lets us look at its commits.
"""

from __future__ import annotations

import json
import os

from conftest import ROOT
from hub_helpers import env_for, hub_cli, hub_python, make_model_folder, one_error_line, tree_bytes
from safetensors.torch import load_file, save_file

pytest_plugins = ["hub_fixtures"]  # the hub_server fixture (harmless once conftest loads it too)

PUSHED = {"README.md", "model.safetensors", "ema.safetensors", "recipe.toml", "metrics.jsonl", "samples.png"}


def test_push_then_pull_gives_the_same_files(hub_server, tmp_path):
    src = make_model_folder(tmp_path / "src")
    env = env_for(hub_server, tmp_path)
    proc = hub_cli(env, "hub", "push", str(src), "org/tiny", "--message", "first model")
    assert proc.returncode == 0, proc.stderr
    head = hub_server.head("org/tiny")
    assert proc.stdout.strip() == f"hf://org/tiny@{head}"
    commits = hub_server.commits("org/tiny")
    assert len(commits) == 2 and commits[0].message == "first model"  # one commit for the whole push
    assert set(hub_server.files("org/tiny")) == PUSHED

    out = tmp_path / "pulled"
    proc = hub_cli(env, "hub", "pull", "org/tiny", "--local-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    pulled = tree_bytes(out)
    assert set(pulled) == PUSHED
    assert {k: v for k, v in pulled.items() if k != "README.md"} == tree_bytes(src)
    info = json.loads((out / "minfm_source.json").read_text())
    assert info == {"repo_id": "org/tiny", "revision": None, "commit": head, "uri": f"hf://org/tiny@{head}",
                    "files": sorted(PUSHED)}


def test_repush_unchanged_is_a_noop_and_changes_send_only_changed_files(hub_server, tmp_path):
    src = make_model_folder(tmp_path / "src")
    env = env_for(hub_server, tmp_path)
    assert hub_cli(env, "hub", "push", str(src), "org/m").returncode == 0
    first = hub_server.head("org/m")
    proc = hub_cli(env, "hub", "push", str(src), "org/m")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to push" in proc.stderr
    assert proc.stdout.strip() == f"hf://org/m@{first}"
    assert hub_server.head("org/m") == first and len(hub_server.commits("org/m")) == 2
    assert len(hub_server.committed_paths) == 1  # no commit request at all the second time

    save_file({"w": __import__("torch").ones(3)}, src / "ema.safetensors")
    assert hub_cli(env, "hub", "push", str(src), "org/m").returncode == 0
    assert hub_server.committed_paths[-1] == ["ema.safetensors"]
    assert len(hub_server.commits("org/m")) == 3


def test_revisions_branches_tags_and_commits(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    v1 = make_model_folder(tmp_path / "v1", seed=1)
    v2 = make_model_folder(tmp_path / "v2", seed=2)
    assert hub_cli(env, "hub", "push", str(v1), "org/r").returncode == 0
    sha1 = hub_server.head("org/r")
    hub_server.tag("org/r", "v1")
    assert hub_cli(env, "hub", "push", str(v2), "org/r", "--revision", "exp/dev").returncode == 0
    assert hub_server.head("org/r") == sha1  # main untouched
    assert hub_server.files("org/r", "exp/dev")["model.safetensors"] == (v2 / "model.safetensors").read_bytes()

    for ref, folder in (("org/r@v1", v1), ("org/r@exp/dev", v2), (f"org/r@{sha1}", v1), ("org/r", v1)):
        proc = hub_cli(env, "hub", "pull", ref)  # into the HF cache
        assert proc.returncode == 0, proc.stderr
        path = proc.stdout.strip().splitlines()[-1]
        got = load_file(f"{path}/model.safetensors")
        want = load_file(folder / "model.safetensors")
        assert all((got[k] == want[k]).all() for k in want), ref

    # a push to a tag's name or to a commit made a branch beside it (a pull of org/r@<sha1>
    # then brought the branch's commit): refused, and the repo keeps its refs
    for rev, why in (("v1", "org/r has a tag of that name"), (sha1, "this is a commit sha")):
        proc = hub_cli(env, "hub", "push", str(v2), "org/r", "--revision", rev)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr
    assert hub_server.head("org/r") == sha1 and hub_server.files("org/r", "v1")["model.safetensors"] == \
        (v1 / "model.safetensors").read_bytes()


def test_resolve_source_hf_uri(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    assert hub_cli(env, "hub", "push", str(make_model_folder(tmp_path / "a", seed=1)), "org/s").returncode == 0
    hub_server.tag("org/s", "v1")
    sha1 = hub_server.head("org/s")
    assert hub_cli(env, "hub", "push", str(make_model_folder(tmp_path / "b", seed=2)), "org/s").returncode == 0
    code = (
        "import json\nfrom minfm_core.sources import resolve_source\nfrom minfm_hub.pull import source_info\n"
        "p = resolve_source('hf://org/s@v1')\n"
        "print(json.dumps({'files': sorted(f.name for f in p.iterdir()), 'info': source_info(p)}))\n"
    )
    proc = hub_python(env, code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert PUSHED <= set(out["files"])
    assert out["info"]["commit"] == sha1 and out["info"]["revision"] == "v1"
    assert out["info"]["uri"] == f"hf://org/s@{sha1}"


def test_large_weights_are_sharded_with_an_index(hub_server, tmp_path):
    src = make_model_folder(tmp_path / "src", ema=False, extras=False)  # 4 tensors of 1 KB each
    env = env_for(hub_server, tmp_path)
    proc = hub_cli(env, "hub", "push", str(src), "org/big", "--max-shard-size", "2500B")
    assert proc.returncode == 0, proc.stderr
    files = hub_server.files("org/big")
    shards = sorted(f for f in files if f.startswith("model-"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "model.safetensors" not in files
    index = json.loads(files["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) == set(shards)

    out = tmp_path / "pulled"
    assert hub_cli(env, "hub", "pull", "org/big", "--local-dir", str(out)).returncode == 0
    merged = {}
    for shard in shards:
        merged.update(load_file(out / shard))
    want = load_file(src / "model.safetensors")
    assert merged.keys() == want.keys() and all((merged[k] == want[k]).all() for k in want)
    # The pulled (sharded) folder pushes again, named by a relative path (was a ValueError: the
    # index's shards came back absolute)
    proc = hub_cli(env, "hub", "push", os.path.relpath(out, ROOT), "org/big2")
    assert proc.returncode == 0, proc.stderr
    assert sorted(f for f in hub_server.files("org/big2") if f.startswith("model-")) == shards
    # Re-pushing the same weights unsharded replaces the shards in one commit.
    assert hub_cli(env, "hub", "push", str(src), "org/big").returncode == 0
    assert not any(f.startswith("model-") or f.endswith("index.json") for f in hub_server.files("org/big"))


def test_training_state_only_on_request(hub_server, tmp_path, trained_run):
    from minfm_core.checkpoint import export_for_hub

    src = export_for_hub(trained_run, tmp_path / "src", include_training_state=True)
    state = {f"checkpoint/{p.name}" for p in (src / "checkpoint").iterdir()}
    # manifest.json, rank_0.safetensors and recipe.toml match the plain pull's patterns too
    assert {"checkpoint/manifest.json", "checkpoint/rank_0.safetensors", "checkpoint/recipe.toml"} <= state
    (src / "checkpoint" / "notes.txt").write_text("not in the manifest: never pushed")
    env = env_for(hub_server, tmp_path)
    assert hub_cli(env, "hub", "push", str(src), "org/t").returncode == 0
    assert not any(f.startswith("checkpoint/") for f in hub_server.files("org/t"))
    assert hub_cli(env, "hub", "push", str(src), "org/t", "--include-training-state").returncode == 0
    assert {f for f in hub_server.files("org/t") if f.startswith("checkpoint/")} == state
    assert "checkpoint/" in hub_server.files("org/t")["README.md"].decode()

    plain, full = tmp_path / "plain", tmp_path / "full"
    assert hub_cli(env, "hub", "pull", "org/t", "--local-dir", str(plain)).returncode == 0
    assert not (plain / "checkpoint").exists() and (plain / "model.safetensors").is_file()
    assert hub_cli(env, "hub", "pull", "org/t", "--local-dir", str(full), "--include-training-state").returncode == 0
    assert tree_bytes(full / "checkpoint") == tree_bytes(src / "checkpoint", exclude=("notes.txt",))


def test_a_push_deletes_what_an_earlier_push_wrote_and_nothing_else(hub_server, tmp_path, trained_run):
    """A weights-only push left an earlier push's checkpoint/ beside the new weights, and
    `train.init_from = "hf://..."` then resumed that older step; samples.png of another
    model stayed too. And every top-level *.safetensors counted as minFM's: someone's LoRA
    in the repo was deleted by the next push."""
    from huggingface_hub import HfApi
    from minfm_core.checkpoint import export_for_hub

    env = env_for(hub_server, tmp_path)
    full = export_for_hub(trained_run, tmp_path / "full", include_training_state=True)
    assert hub_cli(env, "hub", "push", str(full), "org/one", "--include-training-state").returncode == 0
    assert any(f.startswith("checkpoint/") for f in hub_server.files("org/one"))
    api = HfApi(endpoint=env["HF_ENDPOINT"], token=env.get("HF_TOKEN"))
    for name in ("my_lora.safetensors", "NOTES.md"):
        api.upload_file(path_or_fileobj=b"someone else's", path_in_repo=name, repo_id="org/one")

    plain = make_model_folder(tmp_path / "plain", extras=False)
    res = hub_cli(env, "hub", "push", str(plain), "org/one")
    assert res.returncode == 0, res.stderr
    files = set(hub_server.files("org/one"))
    assert files == {"README.md", "model.safetensors", "ema.safetensors", "my_lora.safetensors", "NOTES.md"}
    assert "  - checkpoint/manifest.json" in res.stderr and "  - recipe.toml" in res.stderr
    assert "my_lora" not in res.stderr


def test_a_training_state_that_is_not_a_minfm_checkpoint_is_never_pushed(hub_server, tmp_path):
    src = make_model_folder(tmp_path / "src", extras=False)
    (src / "checkpoint").mkdir()
    (src / "checkpoint" / ".metadata").write_bytes(b"\x80\x04pickled dcp metadata")
    (src / "checkpoint" / "__0_0.distcp").write_bytes(b"\x00" * 64)
    env = env_for(hub_server, tmp_path)
    res = hub_cli(env, "hub", "push", str(src), "org/legacy", "--include-training-state")
    assert res.returncode == 2 and "no manifest.json (not a complete minFM checkpoint)" in one_error_line(res)
    try:
        pushed = hub_server.files("org/legacy")
    except Exception:  # noqa: BLE001 - the repo was never created
        pushed = {}
    assert not any(f.startswith("checkpoint/") for f in pushed)


def test_the_card_parses_and_says_how_to_sample(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    assert hub_cli(env, "hub", "push", str(make_model_folder(tmp_path / "src")), "org/card").returncode == 0
    text = hub_server.files("org/card")["README.md"].decode()
    from huggingface_hub import ModelCard

    data = ModelCard(text).data.to_dict()
    assert data["library_name"] == "minfm" and data["pipeline_tag"] == "text-to-image"
    assert {"minfm", "flow-matching", "flux"} <= set(data["tags"])
    assert data["base_model"] == "base-org/base-model"
    assert data["datasets"] == ["ILSVRC/imagenet-1k"]
    assert "minfm sample hf://org/card" in text
    assert "![sample grid](samples.png)" in text
    assert "| last `loss` | 0.05 |" in text  # from the last metrics.jsonl record
    assert "1.02K parameters" in text  # 4 x 16 x 16


def test_offline_pull_serves_the_cache(hub_server, tmp_path):
    env = env_for(hub_server, tmp_path)
    assert hub_cli(env, "hub", "push", str(make_model_folder(tmp_path / "src")), "org/off").returncode == 0
    online = hub_cli(env, "hub", "pull", "org/off")
    assert online.returncode == 0, online.stderr
    n_requests = len(hub_server.requests)
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    proc = hub_python(offline, "from minfm_core.sources import resolve_source\nprint(resolve_source('hf://org/off'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == online.stdout.strip()
    assert len(hub_server.requests) == n_requests  # nothing asked of the Hub
    line = one_error_line(hub_cli(offline, "hub", "pull", "org/other"))
    assert "HF_HUB_OFFLINE is set and org/other is not in the local cache" in line


def test_the_cards_metrics_leave_out_the_wall_clock(tmp_path):
    """A run's records carry `time` (Unix seconds): the card showed `| last `time` | 1.796e+09 |`."""
    from minfm_hub.card import last_metrics

    record = {"step": 500, "time": 1796075121.67, "loss": 0.25, "grad_norm": 1.1, "lr": 1e-3, "skipped": 0.0,
              "tokens_per_sec": 7242.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert last_metrics(tmp_path) == {k: v for k, v in record.items() if k != "time"}
