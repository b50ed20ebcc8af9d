"""Files from outside that are not regular files: a FIFO blocks a plain ``open`` until a writer
comes, and ``/dev/zero`` reports size 0 yet never ends, so a size check before ``read_bytes``
does not bound either. Each reader refuses them in one line instead of hanging or filling memory.

Every read runs in a worker thread with a deadline, so a regression fails the test instead of
hanging the suite.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from minfm_core.errors import MinfmError
from minfm_core.jsonio import read_json_file
from minfm_core.textfiles import read_bounded, read_text
from minfm_core.cli.main import main
from minfm_core.weights import index_shards

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def within(seconds: float, fn, *args):
    """``fn(*args)``'s result or exception, failing the test if it has not returned in time."""
    box = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still reading after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def special(tmp_path: Path, kind: str, name: str) -> Path:
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    return path


KINDS = ["fifo", "dev_zero", "folder"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reader", [read_bounded, read_text, read_json_file])
def test_readers_refuse_what_is_not_a_regular_file(tmp_path, kind, reader):
    path = special(tmp_path, kind, "x.txt")
    with pytest.raises(MinfmError, match=r"^x\.txt: ") as exc:
        within(10, reader, path, "x.txt", 1 << 20)
    assert "\n" not in str(exc.value)


def test_a_regular_file_and_a_link_to_one_still_read(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"k": 1}))
    (tmp_path / "b.json").symlink_to(tmp_path / "a.json")
    assert within(10, read_json_file, tmp_path / "b.json", "b", 100) == {"k": 1}
    with pytest.raises(MinfmError, match=r"^a: 8 bytes is more than the 7 accepted$"):
        read_bounded(tmp_path / "a.json", "a", 7)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_a_shard_index_that_is_not_a_file_is_refused(tmp_path, kind):
    # read_safetensors looks for a regular index first; index_shards is also public (hub push uses it)
    index = special(tmp_path, kind, "model.safetensors.index.json")
    with pytest.raises(MinfmError, match=r"model\.safetensors\.index\.json: shard index: not a regular file$"):
        within(10, index_shards, index)


@pytest.mark.parametrize("kind", KINDS)
def test_balance_simulate_refuses_a_trace_that_is_not_a_file(tmp_path, capsys, kind):
    trace = special(tmp_path, kind, "trace.json")
    assert within(20, main, ["balance", "simulate", "--bags", "g1n2", "--trace", str(trace)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minfm: error: trace ") and err.endswith("trace.json: not a regular file"), err
    assert "\n" not in err and "Traceback" not in err


def test_balance_simulate_writes_its_trace_out_atomically_never_through_a_link(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text("keep")
    (tmp_path / "out.json").symlink_to(target)
    assert main(["balance", "simulate", "--bags", "g1n2", "--synthetic", "few", "--steps", "2",
                 "--trace-out", str(tmp_path / "out.json")]) == 0
    assert target.read_text() == "keep" and not (tmp_path / "out.json").is_symlink()
    assert len(json.loads((tmp_path / "out.json").read_text())) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_minfm_check_refuses_a_recipe_that_is_not_a_file(tmp_path, capsys, kind):
    recipe = special(tmp_path, kind, "r.toml")
    assert within(20, main, ["check", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"minfm: error: recipe file is not a file: {recipe}", err


def test_a_recipe_over_the_bound_is_refused_unread(tmp_path, capsys, monkeypatch):
    from minfm_core.recipe import load

    monkeypatch.setattr(load, "MAX_RECIPE_BYTES", 64)
    (tmp_path / "r.toml").write_text("# " + "x" * 100 + "\n")
    assert main(["check", str(tmp_path / "r.toml")]) == 2
    assert capsys.readouterr().err.strip().endswith("r.toml: 103 bytes is more than the 64 accepted")


def test_a_fifo_named_metrics_jsonl_is_refused_not_waited_on(tmp_path, capsys):
    from engine_helpers import TINY

    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "metrics.jsonl")
    code = within(120, main, ["run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'run'}", "--set", "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    # refused by the run's pre-flight, before any step (runlock.run_outputs)
    assert code == 2 and err.endswith("metrics.jsonl is not a regular file; the run writes a file there"), err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("trace", ["[[]]", "[[[1, 2]], [[3]], [[4], [5]]]"], ids=["no-ranks", "ragged"])
def test_balance_simulate_refuses_steps_without_ranks_or_of_uneven_ranks(tmp_path, capsys, trace):
    (tmp_path / "t.json").write_text(trace)
    assert main(["balance", "simulate", "--bags", "g1n2", "--trace", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"minfm: error: trace {tmp_path / 't.json'}: expected") and "same number of ranks" in err


def test_a_fifo_at_the_run_lock_is_named(tmp_path, capsys):
    from engine_helpers import TINY

    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / ".minfm.lock")
    assert within(60, main, ["run", str(TINY), "--set", f"run.exp_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().endswith(".minfm.lock: the run lock is not a regular file; remove it "
                                                    "or choose another run.exp_dir")


@pytest.mark.parametrize("target, why", [("efile/x.json", "--trace-out {tmp}/efile/x.json: Not a directory"),
                                         ("dd", "--trace-out {tmp}/dd: a folder, not a file")])
def test_an_atomic_write_that_cannot_happen_names_the_file_asked_for(tmp_path, capsys, target, why):
    (tmp_path / "efile").write_text("")
    (tmp_path / "dd").mkdir()
    assert main(["balance", "simulate", "--bags", "g1n2", "--synthetic", "few", "--steps", "2",
                 "--trace-out", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"minfm: error: {why.format(tmp=tmp_path)}", err
    assert sorted(p.name for p in (tmp_path / "dd").iterdir()) == []  # no temporary file left


@pytest.mark.parametrize("suffix", [".png", ".mp4"])
def test_a_fifo_named_like_a_picture_or_clip_is_refused_not_waited_on(tmp_path, suffix):
    from minfm_core.config import structure
    from minfm_core.registry import get_registry

    if suffix == ".mp4":
        pytest.importorskip("av")
    os.mkfifo(tmp_path / f"z{suffix}")
    (tmp_path / "z.txt").write_text("a fifo")
    name = "image_folder" if suffix == ".png" else "video_folder"
    comp = get_registry().get("dataset", name)
    ds = comp.build(structure({"root": str(tmp_path), "val_fraction": 0.0}, comp.config, path="data"))
    with pytest.raises(MinfmError, match=rf"z\{suffix}: not a regular file$"):
        within(20, ds.__getitem__, 0)


def test_balance_simulate_says_when_a_trace_and_its_flags_disagree(tmp_path, capsys):
    trace = tmp_path / "t.json"
    trace.write_text("[[[1, 2], [3]], [[4], [5, 6]]]")  # two ranks a step
    assert main(["balance", "simulate", "--bags", "g1n2", "--world-size", "4", "--trace", str(trace)]) == 2
    assert f"--world-size 4: the trace {trace} has 2 ranks per step" in capsys.readouterr().err
    assert main(["balance", "simulate", "--bags", "g1n4", "--trace", str(trace)]) == 2
    assert f"trace {trace}: 2 ranks per step, not a multiple of bag spec g1n4's S = 4" in capsys.readouterr().err
    assert main(["balance", "simulate", "--bags", "g1n2", "--trace", str(trace)]) == 0
