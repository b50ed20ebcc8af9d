"""Pretrained references (``org/name[@rev][/path]``) through the Hub: only a complete download is
found again, and a pickle is never fetched. The real client runs in a subprocess."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hub_helpers import env_for, hub_python

pytest_plugins = ["hub_fixtures"]

_RESOLVE = """
import json, sys
from minfm_core.errors import MinfmError
from minfm_hub.pretrained import resolve_pretrained_file
from minfm_hub.uri import parse_ref
try:
    print("PATH", resolve_pretrained_file(parse_ref(sys.argv[1]), sys.argv[2]))
except MinfmError as exc:
    print("ERROR", exc)
"""


def _resolve(env, ref: str, subpath: str) -> str:
    code = _RESOLVE.replace("sys.argv[1]", repr(ref)).replace("sys.argv[2]", repr(subpath))
    proc = hub_python(env, code)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PATH ", "ERROR "))]
    return line


def _shard(name: str) -> bytes:
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 4


def test_a_half_downloaded_folder_is_not_found_as_cached(hub_server, tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
    hub_server.upload("org/t5", {"enc/config.json": b'{"model_type": "t5"}',
                                 "enc/model.safetensors.index.json": json.dumps(index).encode(),
                                 f"enc/{shards[0]}": _shard("a"), f"enc/{shards[1]}": _shard("b")})
    env = env_for(hub_server, tmp_path)
    hub_server.fail_downloads(f"enc/{shards[1]}")
    failed = _resolve(env, "org/t5", "enc")
    assert failed.startswith("ERROR org/t5/enc: ") and "HTTP 500" in failed, failed
    repo_cache = tmp_path / "home" / "hub" / "models--org--t5"
    assert not repo_cache.exists()  # the failed download was taken back out

    hub_server.fail_downloads()
    ok = _resolve(env, "org/t5", "enc")
    assert ok.startswith("PATH "), ok
    folder = Path(ok[len("PATH "):])
    assert folder.parent.parent.name == "snapshots"
    # a download killed half-way (no clean-up ran) leaves a shard missing: not complete, fetched again
    (folder / shards[1]).unlink()
    n_before = len(hub_server.requests)
    again = _resolve(env, "org/t5", "enc")
    assert again == ok and any(shards[1] in p for _, p in hub_server.requests[n_before:])
    assert all((folder / name).is_file() for name in ("config.json", "model.safetensors.index.json", *shards))
    # offline, the complete folder is found by the same reference
    assert _resolve({**env, "HF_HUB_OFFLINE": "1"}, "org/t5", "enc") == ok


def test_a_pickle_file_reference_is_refused_before_downloading(hub_server, tmp_path):
    hub_server.upload("org/evil", {"ae.bin": b"\x80\x04 not really a pickle", "x.safetensors": b"\0" * 16})
    env = env_for(hub_server, tmp_path)
    n_before = len(hub_server.requests)
    line = _resolve(env, "org/evil", "ae.bin")
    assert line == ("ERROR org/evil/ae.bin: refusing pickle-format files (ae.bin); "
                    "minFM only exchanges weights as safetensors"), line
    assert hub_server.requests[n_before:] == []  # not even asked
    assert not (tmp_path / "home" / "hub" / "models--org--evil").exists()
