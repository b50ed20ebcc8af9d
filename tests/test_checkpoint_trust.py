"""Checkpoints from outside never run code: no pickle is read unless the user opts in, and
never from a download; manifests cannot name files outside their checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint_helpers import copy_run, refresh_record, rewrite_manifest
from engine_helpers import TINY
from minfm_core import checkpoint as ck
from minfm_core.checkpoint_format import CheckpointError, read_manifest
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError

#: Modules the old allow-listed unpickler admitted whole, or by name: each imports ``os``,
#: so a protocol-4 STACK_GLOBAL can name ``os.mkdir`` *through* them.
ADMITTED = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
            "torch.serialization", "pathlib", "collections", "torch")


def evil_pickle(canary: Path, protocol: int, module: str = "os", name: str = "mkdir") -> bytes:
    """``module.name(str(canary))`` as raw pickle opcodes: GLOBAL below protocol 4, STACK_GLOBAL from 4."""
    arg = str(canary).encode()
    call = b"X" + len(arg).to_bytes(4, "little") + arg + b"\x85R."  # BINUNICODE, TUPLE1, REDUCE, STOP
    if protocol >= 4:
        def short(s: str) -> bytes:
            return b"\x8c" + bytes([len(s)]) + s.encode()

        return b"\x80" + bytes([protocol]) + short(module) + short(name) + b"\x93" + call
    return b"\x80" + bytes([protocol]) + b"c" + module.encode() + b"\n" + name.encode() + b"\n" + call


def payloads(canary: Path) -> list[tuple[str, bytes]]:
    out = [(f"GLOBAL p{p}", evil_pickle(canary, p, "posix", "mkdir")) for p in (2, 3)]
    out += [(f"STACK_GLOBAL p{p}", evil_pickle(canary, p)) for p in (4, 5)]
    for mod in ADMITTED:
        if hasattr(importlib.import_module(mod), "os"):
            out.append((f"{mod}.os.mkdir", evil_pickle(canary, 4, mod, "os.mkdir")))
    return out


def one_line_exit_2(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_the_manifest_format_has_no_pickle(trained_run):
    ckpt = ck.list_checkpoints(trained_run)[-1]
    assert not (ckpt / ".metadata").exists()
    for f in ckpt.glob("*.distcp"):  # safetensors: an 8-byte header length, then JSON
        head = f.read_bytes()[:9]
        assert head[8:9] == b"{", f
    manifest = read_manifest(ckpt)
    assert {"model", "ema", "optimizer", "scheduler", "step", "trainer"} <= manifest.parts()


@pytest.mark.parametrize("kind", ["GLOBAL p2", "STACK_GLOBAL p4", "torch.distributed.checkpoint.metadata.os.mkdir"])
def test_pickled_metadata_without_manifest_is_refused_by_every_command(trained_run, tmp_path, capsys, kind):
    canary = tmp_path / "canary"
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]
    (ckpt / "manifest.json").unlink()
    (ckpt / ".metadata").write_bytes(dict(payloads(canary))[kind])
    err = one_line_exit_2(capsys, ["sample", str(run), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                                   "--out", str(tmp_path / "out")])
    assert "pickle" in err and "--allow-pickle-checkpoint" in err
    one_line_exit_2(capsys, ["export", "diffusers", str(run), str(tmp_path / "exported")])
    one_line_exit_2(capsys, ["run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'new'}",
                             "--set", f"train.init_from={ckpt}", "--set", "train.max_steps=1"])
    assert not canary.exists()


def test_every_payload_is_never_unpickled(trained_run, tmp_path):
    """Beside a manifest, a hostile .metadata is simply never read; as a .distcp it fails as data."""
    canary = tmp_path / "canary"
    for i, (kind, data) in enumerate(payloads(canary)):
        run = copy_run(trained_run, tmp_path / f"run{i}")
        ckpt = ck.list_checkpoints(run)[-1]
        (ckpt / ".metadata").write_bytes(data)
        model = ck.build_denoiser(run / "recipe.toml")
        ck.load_weights(ckpt, model, source="ema")  # the manifest is the only index
        distcp = next(ckpt.glob("*.distcp"))
        distcp.write_bytes(data)
        refresh_record(ckpt, distcp.name)  # a forger rewrites the checksum too
        with pytest.raises(CheckpointError, match="unreadable tensor data"):
            ck.load_weights(ck.open_checkpoint(ckpt), model)
        assert not canary.exists(), kind


def legacy_checkpoint(run: Path) -> tuple[Path, torch.nn.Module]:
    """What an older minFM wrote beside ``run``'s newest checkpoint: DCP's default format
    (torch.save shards, pickled .metadata) of its weights; (its folder, the model)."""
    import torch.distributed.checkpoint as dcp

    ckpt = ck.list_checkpoints(run)[-1]
    model = ck.build_denoiser(run / "recipe.toml")
    ck.load_weights(ckpt, model)
    legacy = run / "checkpoints" / "step_00000009"
    legacy.mkdir()
    (legacy / "recipe.toml").write_text((ckpt / "recipe.toml").read_text())
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(legacy), no_dist=True)
    return legacy, model


def test_legacy_checkpoint_loads_only_on_opt_in_and_never_from_a_download(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    legacy, model = legacy_checkpoint(run)
    with pytest.raises(CheckpointError, match="--allow-pickle-checkpoint"):
        ck.open_checkpoint(legacy)
    other = ck.build_denoiser(run / "recipe.toml")
    ck.load_weights(ck.open_checkpoint(legacy, allow_pickle=True), other)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert main(["sample", str(legacy), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "out"), "--allow-pickle-checkpoint"]) == 0
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 1
    (run / "minfm_source.json").write_text("{}")  # a pulled folder: no opt-in applies
    with pytest.raises(CheckpointError, match="never loads one from a Hub repo"):
        ck.open_checkpoint(legacy, allow_pickle=True)


@pytest.mark.parametrize("name", ["../recipe.toml", "/etc/passwd", "a/../../x", "~/x", "", "sub\\..\\x"])
def test_manifest_names_stay_inside(trained_run, tmp_path, name):
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]

    def edit(m):
        first = next(iter(m["files"]))
        m["files"][name] = m["files"].pop(first)
        for t in m["tensors"].values():
            for c in t["chunks"]:
                if c["file"] == first:
                    c["file"] = name

    rewrite_manifest(ckpt, edit)
    with pytest.raises(CheckpointError, match="refusing path|bad entry|not a plain"):
        ck.open_checkpoint(ckpt)


def test_symlinked_file_is_refused(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]
    outside = tmp_path / "outside.safetensors"
    (ckpt / "rank_0.safetensors").rename(outside)
    os.symlink(outside, ckpt / "rank_0.safetensors")
    with pytest.raises(CheckpointError, match="refusing path|not a regular file"):
        ck.open_checkpoint(ckpt)


def test_chunk_pointing_at_an_unlisted_file_is_refused(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]
    rewrite_manifest(ckpt, lambda m: next(iter(m["tensors"].values()))["chunks"][0].__setitem__("file", "recipe.toml.x"))
    with pytest.raises(CheckpointError, match="bad entry for tensor"):
        ck.open_checkpoint(ckpt)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)


def _with_crc(manifest: dict) -> bytes:
    """A manifest whose own checksum is right, so the structural checks are what is tested."""
    from minfm_core.checkpoint_format import SELF_CRC, _self_crc

    return json.dumps({**manifest, SELF_CRC: _self_crc(manifest)}).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=512) | _json.map(lambda v: json.dumps(v).encode())
       | st.fixed_dictionaries({"format": st.just("minfm.checkpoint"), "version": st.just(1), "files": _json,
                                "tensors": _json, "objects": _json}).map(_with_crc))
def test_random_manifests_raise_only_checkpoint_errors(tmp_path, raw):
    folder = tmp_path / "step_00000001"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes(raw)
    try:
        manifest = read_manifest(folder)
        manifest.metadata()
    except CheckpointError:
        pass


def test_json_objects_never_stand_in_for_tensors(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]
    name = next(f for f in read_manifest(ckpt).tensors if f.startswith("model."))
    rewrite_manifest(ckpt, lambda m: m["objects"].append([name.split("."), 5]))
    with pytest.raises(CheckpointError, match="overlaps a tensor"):
        ck.open_checkpoint(ckpt)


@pytest.mark.parametrize("edit", [
    lambda g: g.__setitem__("lr", "fast"),
    lambda g: g.__setitem__("betas", {"tuple": [0.9]}),
    lambda g: g.__setitem__("params", ["not.a.parameter"]),
    lambda g: g.pop("eps"),
], ids=["lr-text", "betas-short", "params", "missing-key"])
def test_hostile_param_groups_are_one_line(trained_run, tmp_path, capsys, edit):
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]

    def forge(m):
        for path, value in m["objects"]:
            if path == ["optimizer", "param_groups"]:
                edit(value[0]["dict"])

    rewrite_manifest(ckpt, forge)
    err = one_line_exit_2(capsys, ["run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'new'}",
                                   "--set", f"train.init_from={ckpt}", "--set", "train.max_steps=5"])
    assert "param groups do not fit" in err


@pytest.mark.parametrize("forge, why", [
    (lambda c: c[0]["sizes"].__setitem__(0, 1), "do not cover it exactly once"),  # rows 1.. would be garbage
    (lambda c: c.append(dict(c[0])), "do not cover it exactly once"),  # every element twice
    (lambda c: c.__setitem__(0, {**c[0], "sizes": [c[0]["sizes"][0] // 2, c[0]["sizes"][1]]})
     or c.append({**c[0], "offsets": [1, 0]}), "do not cover it exactly once"),  # overlapping halves
], ids=["gap", "twice", "overlap"])
def test_chunks_must_tile_their_tensor(trained_run, tmp_path, forge, why):
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]
    name = next(f for f, t in read_manifest(ckpt).tensors.items() if f.startswith("model.") and len(t["shape"]) == 2)
    rewrite_manifest(ckpt, lambda m: forge(m["tensors"][name]["chunks"]))
    with pytest.raises(CheckpointError, match=f"chunks of tensor '{name}' {why}"):
        ck.open_checkpoint(ckpt)


def test_chunk_tiling_accepts_row_and_grid_shards():
    from minfm_core.checkpoint_format import _tiles

    rows = [{"offsets": [o, 0], "sizes": [2, 6]} for o in range(0, 1000, 2)]  # 500 ranks' row shards
    assert _tiles([1000, 6], rows[::-1])
    grid = [{"offsets": [r, c], "sizes": [2, 3]} for r in (0, 2) for c in (0, 3)]
    assert _tiles([4, 6], grid) and not _tiles([4, 6], grid[:3]) and not _tiles([4, 6], [*grid[:3], grid[0]])
    assert _tiles([], [{"offsets": [], "sizes": []}]) and not _tiles([], [{"offsets": [], "sizes": []}] * 2)
    assert _tiles([0, 4], [{"offsets": [0, 0], "sizes": [0, 4]}])  # an empty tensor, an empty chunk


@pytest.mark.parametrize("path", [["model", "evil"], ["model", "a", "b"], ["ema", "evil"], ["optimizer", "nope"]])
def test_an_object_with_no_place_in_the_state_is_refused(trained_run, tmp_path, capsys, path):
    run = copy_run(trained_run, tmp_path / "run")
    ckpt = ck.list_checkpoints(run)[-1]
    rewrite_manifest(ckpt, lambda m: m["objects"].append([path, 5]))
    argv = {"model": ["sample", str(ckpt), "--prompt", "x", "--n", "1", "--steps", "1", "--out", str(tmp_path / "o"),
                      "--no-ema"],
            "ema": ["run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'new'}", "--set", f"train.init_from={ckpt}",
                    "--set", "train.init_load_plan=model:model,ema:ema", "--set", "train.max_steps=5"],
            "optimizer": ["run", str(TINY), "--set", f"run.exp_dir={run}", "--set", "train.max_steps=5"]}[path[0]]
    err = one_line_exit_2(capsys, argv)
    assert f"object {'.'.join(path)} has no place in what is loaded" in err


def test_a_legacy_checkpoint_never_exports_its_pickled_training_state(trained_run, tmp_path):
    legacy, _ = legacy_checkpoint(copy_run(trained_run, tmp_path / "run"))
    with pytest.raises(MinfmError, match="a legacy checkpoint's training state is pickled and is never exported"):
        ck.export_for_hub(legacy, tmp_path / "out", include_training_state=True, allow_pickle=True)
    assert not (tmp_path / "out").exists()
    out = ck.export_for_hub(legacy, tmp_path / "out", allow_pickle=True)  # the weights are converted
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "recipe.toml"} <= names and "checkpoint" not in names


def test_a_downloaded_checkpoint_takes_no_recipe_from_outside_the_download(trained_run, tmp_path):
    pulled = tmp_path / "mine" / "pulled"
    pulled.mkdir(parents=True)
    shutil.copytree(ck.list_checkpoints(trained_run)[-1], pulled / "checkpoint")
    (pulled / "minfm_source.json").write_text("{}")
    (pulled / "checkpoint" / "recipe.toml").unlink()
    (tmp_path / "mine" / "recipe.toml").write_text("the user's own file")
    with pytest.raises(MinfmError, match="no recipe.toml found"):
        ck.recipe_for(pulled / "checkpoint")
    (pulled / "recipe.toml").write_text("x")
    assert ck.recipe_for(pulled / "checkpoint") == pulled / "recipe.toml"
    # a run of the user's own: the step folder's recipe, else the run's
    run = copy_run(trained_run, tmp_path / "run")
    step = ck.list_checkpoints(run)[-1]
    assert ck.recipe_for(step) == step / "recipe.toml"
    (step / "recipe.toml").unlink()
    assert ck.recipe_for(step) == run / "recipe.toml"


def test_an_older_checkpoint_exports_what_the_run_had_by_its_step(tmp_path, trained_run):
    """`minfm hub push run/checkpoints/step_2` published the metrics and the sample grid of
    steps after 2 (the card's "last step" 4, the step-4 gallery): a push made while
    training goes on, or of an older checkpoint, described another model than its weights."""
    from checkpoint_helpers import copy_run
    from PIL import Image

    from minfm_core.checkpoint import export_for_hub

    run = copy_run(trained_run, tmp_path / "run")
    for step, color in ((2, (255, 0, 0)), (4, (0, 0, 255))):
        (run / "samples" / f"step_{step:08d}").mkdir(parents=True)
        Image.new("RGB", (4, 4), color).save(run / "samples" / f"step_{step:08d}" / "ema.png")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0\n')  # cut short by a crash: kept as it was
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert max(steps) == 4

    old = export_for_hub(run / "checkpoints" / "step_00000002", tmp_path / "old")
    kept = (old / "metrics.jsonl").read_text().splitlines()
    assert kept[-1] == '{"step": 3, "loss": 1.0' and 2 in steps
    assert [json.loads(x).get("step") for x in kept[:-1]] == [s for s in steps if s is None or s <= 2]
    assert Image.open(old / "samples.png").getpixel((0, 0)) == (255, 0, 0)

    new = export_for_hub(run, tmp_path / "new")  # the run: its newest checkpoint, step 4
    assert (new / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    assert Image.open(new / "samples.png").getpixel((0, 0)) == (0, 0, 255)


def test_an_exported_recipe_names_no_folder_of_the_trainers(tmp_path, trained_run):
    """The pushed recipe.toml held the run's absolute run.exp_dir (/home/<user>/...): it told
    everyone the trainer's folders, and `minfm run` of the pulled recipe refused it anyway."""
    from minfm_core.checkpoint import export_for_hub
    from minfm_core.recipe.toml import tomllib

    before = tomllib.loads((trained_run / "recipe.toml").read_text())
    assert os.path.isabs(before["run"]["exp_dir"])
    after = tomllib.loads((export_for_hub(trained_run, tmp_path / "out") / "recipe.toml").read_text())
    assert after["run"]["exp_dir"] == f"experiments/{trained_run.name}"
    assert {**after, "run": before["run"]} == before  # nothing else changed


def test_a_forged_row_of_many_chunks_is_checked_in_one_sweep():
    """A [1, N] tensor in N 1x1 chunks all opened at row 0: every pair was compared (N = 8,000
    took minutes; 80,000 fits the manifest limit). The sweep now runs along the dimension of
    most distinct offsets; past MAX_CHUNKS_PER_TENSOR a tensor is refused unread."""
    from minfm_core.checkpoint_format import MAX_CHUNKS_PER_TENSOR, _check_schema, _self_crc, _tiles

    n = MAX_CHUNKS_PER_TENSOR
    row = [{"offsets": [0, k], "sizes": [1, 1]} for k in range(n)]
    assert _tiles([1, n], row)
    assert not _tiles([1, n], [*row[:-1], {"offsets": [0, 0], "sizes": [1, 1]}])  # one element twice, one never

    def manifest(chunks, objects=()):
        data = {"format": "minfm.checkpoint", "version": 1, "files": {"a.safetensors": {"bytes": 1, "crc32": "00000000"}},
                "tensors": {"model.w": {"dtype": "float32", "shape": [1, len(chunks)],
                                        "chunks": [{**c, "file": "a.safetensors"} for c in chunks]}},
                "objects": [list(o) for o in objects]}
        data["manifest_crc32"] = _self_crc(data)
        return data

    _check_schema(Path("f"), manifest(row[:4]))
    too_many = [{"offsets": [0, k], "sizes": [1, 1]} for k in range(n + 1)]
    with pytest.raises(CheckpointError, match="bad entry for tensor 'model.w'"):
        _check_schema(Path("f"), manifest(too_many))
    # objects against tensors, by dotted prefix either way (one set, not every pair)
    for name in (["model"], ["model", "w"], ["model", "w", "x"]):
        with pytest.raises(CheckpointError, match="overlaps a tensor"):
            _check_schema(Path("f"), manifest(row[:4], [(name, 1)]))
    _check_schema(Path("f"), manifest(row[:4], [(["model", "v"], 1), (["mod"], 1)]))
