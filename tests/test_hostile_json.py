"""Deeply nested JSON from outside: every reader names the file in one line (or skips the line
it was reading), none ends in a RecursionError traceback.

``json.loads`` refuses deep nesting with RecursionError, not ValueError; 60 KB of brackets
is enough, small enough to pass every size bound (a pulled repo's minfm_source.json: 64 KiB).
"""

from __future__ import annotations

import json

import pytest
import torch

from minfm_core.cli.main import main
from minfm_core.config import structure
from minfm_core.errors import MinfmError
from minfm_core.jsonio import parse_json
from minfm_core.registry import get_registry

DEEP = "[" * 30_000 + "]" * 30_000


def build(kind: str, name: str, split: str | None = None, **cfg):
    comp = get_registry().get(kind, name)
    config = structure(cfg, comp.config)
    return comp.build(config, split=split) if split else comp.build(config, load_weights=True)


def test_parse_json_names_the_input_for_each_failure():
    for text, why in ((DEEP, "nested too deeply"), ("{'a': 1}", "Expecting property name"), (b"\xff", "")):
        with pytest.raises(MinfmError) as err:
            parse_json(text, "x.json")
        assert str(err.value).startswith("x.json: not valid JSON (") and why in str(err.value)
    assert parse_json(b'{"a": [1]}', "x.json") == {"a": [1]}


def test_a_dataset_index_and_captions(tmp_path):
    index = tmp_path / "latents" / "train" / "index.json"
    index.parent.mkdir(parents=True)
    index.write_text(DEEP)
    with pytest.raises(MinfmError, match=r"index.json: not valid JSON \(nested too deeply\)"):
        build("dataset", "shapes", "train", use_cached_latents=True, latents_dir=str(tmp_path / "latents"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n" + DEEP + "\n")
    with pytest.raises(MinfmError, match=r"metadata.jsonl:2: not valid JSON \(nested too deeply\)"):
        build("dataset", "image_folder", "train", root=str(folder))


def test_class_embedding_labels(tmp_path):
    from minfm_plugins.text_encoders.class_embedding import save_class_table

    save_class_table(torch.zeros(2, 4), {"": 0, "cat": 1}, tmp_path / "t.safetensors")
    (tmp_path / "labels.json").write_text(DEEP)
    with pytest.raises(MinfmError, match=r"labels in .*labels.json: not valid JSON \(nested too deeply\)"):
        build("text_encoder", "class_embedding", embeddings=str(tmp_path / "t.safetensors"),
              labels=str(tmp_path / "labels.json"), num_rows=2, dim=4)


def test_a_trace_file(tmp_path, capsys):
    (tmp_path / "t.json").write_text(DEEP)
    assert main(["balance", "simulate", "--trace", str(tmp_path / "t.json"), "--bags", "g1n1"]) == 2
    assert capsys.readouterr().err.strip() == f"minfm: error: trace {tmp_path / 't.json'}: not valid JSON (nested too deeply)"


def test_records_a_reader_may_skip_are_skipped(tmp_path):
    """A pulled repo's minfm_source.json is only believed when well-formed; metrics lines that do not parse are passed over."""
    from minfm_core.jsonio import last_jsonl_record
    from minfm_hub.card import last_metrics as card_metrics
    from minfm_hub.pull import source_info

    (tmp_path / "minfm_source.json").write_text(DEEP)
    assert source_info(tmp_path) is None
    good = {"step": 3, "loss": 0.5}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(good) + "\n" + DEEP + "\n")
    assert last_jsonl_record(tmp_path / "metrics.jsonl", "loss") == good
    assert card_metrics(tmp_path) == good


def test_a_metrics_file_is_read_from_its_tail(tmp_path):
    """Only the last MiB is read (a long run's file costs what a short one's does); the cut first line is skipped."""
    from minfm_core.jsonio import last_jsonl_record

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": i, "loss": 1.0 / (i + 1)}) for i in range(60_000)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 60000, "lo')  # a live run's half-written line
    assert path.stat().st_size > 2 << 20
    assert last_jsonl_record(path, "loss") == {"step": 59_999, "loss": 1.0 / 60_000}
    assert last_jsonl_record(path, "loss", tail_bytes=40) == {}  # one cut line only: nothing whole
    assert last_jsonl_record(tmp_path / "missing.jsonl", "loss") == {}
