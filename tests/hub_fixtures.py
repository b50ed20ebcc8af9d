"""Pytest fixtures for Hub tests: a local Hub-compatible server (tests/hubserver.py).

Import from conftest.py (``from hub_fixtures import hub_server, hub_env``) or list this
module in ``pytest_plugins``.
"""

from __future__ import annotations

import pytest

from hubserver import HubServer


@pytest.fixture
def hub_server():
    """A fresh, empty in-process Hub for one test; ``.endpoint``, ``.env(hf_home)``, ``.upload(...)``."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_env(hub_server, tmp_path):
    """Environment dict for a subprocess talking to ``hub_server`` (own HF_HOME under tmp_path)."""
    return hub_server.env(tmp_path / "hf_home")


# -- hostile payloads ----------------------------------------------------------------------
# What a stranger's repo may hold instead of weights. Every payload that could run code
# does one visible thing if it ever runs: it creates the ``canary`` path.

class _MakeCanary:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.canary,))


def pickle_bomb(canary, protocol: int = 4) -> bytes:
    """A pickle that creates ``canary`` when unpickled (``torch.load``'s classic payload)."""
    import pickle

    return pickle.dumps({"state_dict": _MakeCanary(canary)}, protocol=protocol)


def header_bytes(header: bytes, declared: int | None = None, body: bytes = b"") -> bytes:
    """A file that starts like safetensors: an 8-byte little-endian length, then ``header``."""
    n = len(header) if declared is None else declared
    return n.to_bytes(8, "little") + header + body


def hostile_safetensors(canary) -> dict[str, bytes]:
    """name -> bytes of files that claim to be ``model.safetensors`` and are not."""
    import os

    return {
        "random": os.urandom(4096),
        "pickle": pickle_bomb(canary),
        "oversized-header": header_bytes(b'{"a": ' + b" " * 64 + b"}", declared=2**40),
        "truncated": header_bytes(b'{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}', body=b"\0" * 16),
        "bad-json": header_bytes(b"{not json at all}"),
        "empty": b"",
    }


def shard_index(*names: str) -> bytes:
    """A ``model.safetensors.index.json`` whose weight_map names ``names`` (one tensor each)."""
    import json

    return json.dumps({"metadata": {"total_size": 4},
                       "weight_map": {f"t{i}": n for i, n in enumerate(names)}}).encode()


@pytest.fixture
def canary(tmp_path):
    """A path no test may ever see created: hostile payloads create it if they run."""
    path = tmp_path / "CANARY"
    yield path
    assert not path.exists(), "a hostile payload ran"
